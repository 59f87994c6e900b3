"""The datapath: what the kernel must hold for the node's pods, and the code that puts it there.

- :mod:`membrane.datapath.ruleset` — desired state → the nft ruleset (pure);
- :mod:`membrane.datapath.policy` — the policy engine's typed verdicts → policy map elements (pure);
- :mod:`membrane.datapath.flowcodes` — the log prefix code its rules write and the observer reads (pure);
- :mod:`membrane.datapath.nft` — nft objects, rendering, transactions, runner (real and fake);
- :mod:`membrane.datapath.netlink` — veths, addresses, routes (real and fake);
- :mod:`membrane.datapath.reconcilers` — apply desired state, retry, prune what the agent owns;
- :mod:`membrane.datapath.netns` — entering network namespaces without forking.
"""
