"""The build engine: context, sandbox, snapshots, store, images, CLI (every side effect)."""
