"""Agent kinds shipped with the mesh. Each is one small file; the config allows them by name."""
