"""OCI registries: push catalogue images (their qcow2 chains as layers) and pull them back.

reference.py parses ``host/repo:tag``; auth.py reads the user's container-tool credentials
and answers Basic/Bearer challenges; client.py speaks the distribution HTTP API v2 over
http.client (chunked, resumable uploads, mounts, streamed and verified blob reads);
layers.py turns a stored chain file into a deterministic layer; artifact.py builds and
vets manifests and the config blob; push.py, pull.py and containerdisk.py are the use cases.
"""
