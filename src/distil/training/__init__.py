"""Training: the loop (`loop`), what each step computes (`objective`), what is settled before the first step
(`accelerator`, `models`, `student_source`, `optimisation`), held-out evaluation (`heldout`), the run directory
(`run_dir`), checkpoints (`checkpoint`) and the fused output layer (`fused_head`)."""
