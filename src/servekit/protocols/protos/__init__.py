"""Messages and services of the gRPC APIs, generated from the .proto files beside this module.

Regenerate the `*_pb2.py` files with `make protos`. The packages, message names and field
numbers are those of the published APIs, so clients built from the original definitions work
with servekit unchanged. Only the parts that servekit serves are declared.
"""

from google.protobuf import any_pb2, descriptor_pool, wrappers_pb2

# The messages live in a pool of their own, not in protobuf's default pool, because clients
# such as tritonclient and tensorflow-serving-api register the same message names there. With
# one shared pool, importing servekit beside them would fail with "duplicate symbol".
POOL = descriptor_pool.DescriptorPool()
for _well_known in (any_pb2, wrappers_pb2):
    POOL.AddSerializedFile(_well_known.DESCRIPTOR.serialized_pb)
