"""The offline testbed: the shapes scenes and benchmark, the recipe that trained the shipped model (and the model,
`shapes-llava/`), diagnostics on it, and tiny random models and data built in code for the tests."""
