"""The main job's pieces, below its entry point (``megatron_conan/quickstart.py``): the plans
(`plan`), the work directory and shared state (`workspace`), the steps by concern (`data_steps`,
`training_steps`, `evaluation_steps`, put together in `pipeline`) and what the studies in
benchmarks/ share (`study`)."""
