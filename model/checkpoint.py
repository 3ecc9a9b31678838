from .loading import CheckpointError, read_state_dict, strip_prefix  # TEMPORARY shim
