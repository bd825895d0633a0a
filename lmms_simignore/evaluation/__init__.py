"""lmms-eval runs and what is built on them: sweeps over configs, the leaderboard, the main job (demo), the accuracy
regression and setup's self-check."""
