"""Generated protobuf and gRPC code. Never edit by hand: run ``python scripts/gen_protos.py``.

All messages live in :data:`POOL`, a descriptor pool private to sealserve, not in
protobuf's default pool. Message names (``inference.ModelInferRequest``) are not on
the wire; the service path and field numbers are. So sealserve stays wire-compatible
with every OIP client while a process can import ``tritonclient.grpc`` (which puts its
own ``inference.*`` types into the default pool) side by side without a
"duplicate symbol" crash.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
