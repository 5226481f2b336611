"""Keep a single-machine Ray Serve off the network.

Ray Serve 2.60 replicas open an inter-deployment gRPC server on ``[::]:0``, all interfaces, and
the address is not configurable. On the embedded single-node default
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, node address 127.0.0.1) peers only ever dial
127.0.0.1, so binding there is equivalent and exposes nothing. In a real multi-node cluster the
variable is unset or 1 and Ray is left alone.
"""

import os

_ALL_INTERFACES = "[::]:"


def single_node_mode() -> bool:
    """Whether Ray runs as the embedded loopback-only single node."""
    return os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"


def bind_replica_grpc_to_loopback() -> bool:
    """In single-node mode, make this replica's gRPC server listen on 127.0.0.1 only.

    Must run inside the replica before it finishes initializing (the deployment's constructor).

    Returns:
        Whether the binding was changed.

    """
    if not single_node_mode():
        return False
    # The only place the bind address is chosen; Ray pinned to 2.60 (require_supported_ray).
    from ray.serve._private import replica  # noqa: TID251

    original = replica.add_port_to_grpc_server
    if getattr(original, "loopback_only", False):
        return True

    def add_port_loopback(server, address: str) -> int:
        if address.startswith(_ALL_INTERFACES):
            address = "127.0.0.1:" + address.removeprefix(_ALL_INTERFACES)
        return original(server, address)

    add_port_loopback.loopback_only = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port_loopback
    return True
