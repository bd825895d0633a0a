"""lmms-eval model classes; they call `lmms_simignore.engine` and never re-implement it."""
