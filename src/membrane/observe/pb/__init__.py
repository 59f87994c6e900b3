"""Python modules generated from ``proto/`` by ``make protos`` (committed; do not edit by hand).

``flow.flow_pb2`` (Flow, FlowFilter, LostEvent …), ``observer.observer_pb2`` (GetFlowsRequest,
ServerStatusResponse …), ``relay.relay_pb2``, ``peer.peer_pb2`` and ``health.health_pb2``.
"""
