"""The toy preset: a procedural world (`world`), its pixel oracle (`oracle`), the trained toy
checkpoints (`weights/`, loaded by `luna.models.toy.models`) and their training (`train`)."""
