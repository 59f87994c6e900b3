"""Flow visibility in Hubble's mould: the flow model, the ring, filters, the observer API, printers.

``model`` (the protobuf Flow and its helpers), ``ring``, ``filters``, ``observer`` (GetFlows and
friends over a ring, the publisher), ``server``/``client`` (gRPC), ``printer``, ``cliflags``,
``metrics``, ``exporter``; the datapath side reads events into flows (``nflog``, ``conntrack``,
``enrich``; the log prefix codes they decode are :mod:`membrane.datapath.flowcodes`) and
``relay`` merges nodes. See docs/observe.md.

Kept free of imports: the CLI loads these modules only for the commands that need them.
"""
