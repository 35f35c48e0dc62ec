"""Task fine-tuning and task distillation: classification, NER (token classification) and extractive QA.

The "second step" of DistilBERT: a student is fine-tuned on a downstream task while matching the
softened outputs of a teacher already fine-tuned on it. `finetune.run_task` is the entry point.
"""
