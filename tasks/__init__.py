"""lmms-eval task YAMLs shipped with lmms_simignore; pass this folder to `lmms-eval --include_path`."""
