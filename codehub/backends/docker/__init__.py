"""The Docker backend: everything that talks to a Docker engine, behind the interfaces.

Guarantees:
- `containers.DockerInstanceController` and `volumes.DockerVolumeStorage` implement
  InstanceController and StorageProvider (codehub.interfaces) and pass the conformance
  suite (tests/conformance/); each module states its own guarantees.
- Everything made on the engine carries CodeHub's ownership labels
  (codehub.backends.rules) and nothing without them is ever removed.
- The engine idioms (failures as AdapterError, "404 means gone") are engine.py's alone;
  the archive's bytes are the Docker-free codehub.storage.codec and .tarfilter's.
- Neither adapter owns the engine client it is given: leaving `async with` releases only
  what the adapter opened itself.
"""
