"""Task recipes' library code: translation, question answering, sentiment classification, retrieval and chat SFT,
with the offline data they default to and the metrics they report. Each recipe module has
`main(argv: list[str] | None = None) -> dict`; the scripts in `scripts/` only call it. See docs/tasks.md.

  data.py          offline datasets from pip packages (Bible EN/FR/DE, country-facts QA, VADER sentiment)
  common.py        HF example-script flags, file loading with errors naming the file, tokenizer/model loading
  generation.py    prompt -> completion encoding (loss on the completion) and batched left-padded generate()
  metrics.py       sacrebleu BLEU/chrF; SQuAD EM/F1 through the local evaluate module squad_metric/
  peft_utils.py    LoRA on attention / router / 3D experts, adapter size, merge check, QLoRA refusal
  translation.py   run_translation-style recipe          qa.py              run_qa-style recipe (+ --generative)
  classification.py run_classification-style recipe     retrieval.py       mean-pooled embeddings, recall@k
  sft.py           TRL SFTTrainer on chat JSON lines      translation_study.py  MoE vs dense over seeds
"""
