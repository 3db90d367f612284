r"""The paper's language setting: a frozen text encoder (BERT, RoBERTa, GPT-2) on GLUE in domain and
GLUE-X out of domain, with lp, mlp and nmtune on its pooled features (docs/text.md).

The encoder (config.checkpoint, or model=DIR after ':') is a Hugging Face folder written by
save_pretrained (config.json, model.safetensors or pytorch_model.bin, the tokenizer's files) or
the workdir configs/import.py makes of one. GLUE comes from TFDS, prepared once as array_record
on a machine with internet and TensorFlow (nmjax reads it without either):
  tfds build glue/sst2 --data_dir=$HOME/.cache/nmjax/tfds --file_format=array_record
  tfds build glue/mnli --data_dir=$HOME/.cache/nmjax/tfds --file_format=array_record
GLUE-X's out-of-domain sets ship as files: give each one's path (jsonl, csv or tsv), and its
field names where they differ from the ones declared below.

BERT-Large (cls pooling), SST-2 and MNLI in domain, GLUE-X's sentiment and NLI sets out of domain:
  .venv/bin/python main.py --config configs/import.py --config.source=models/bert-large-uncased \
      --workdir runs/import_bert_large
  .venv/bin/python main.py --config configs/text_transfer.py:model=runs/import_bert_large \
      --config.text_files.imdb.test=glue_x/imdb.tsv --config.text_files.yelp.test=glue_x/yelp.tsv \
      --config.text_files.amazon.test=glue_x/amazon.tsv \
      --config.text_files.snli.test=glue_x/snli.tsv --config.text_files.sick.test=glue_x/sick.tsv \
      --workdir runs/text_bert_large
GPT-2 (last-token pooling), the same tasks, straight from its Hugging Face folder:
  .venv/bin/python main.py --config configs/text_transfer.py:model=models/gpt2 \
      --config.text_files.imdb.test=glue_x/imdb.tsv --config.text_files.snli.test=glue_x/snli.tsv \
      --workdir runs/text_gpt2
The probes lp and ridge (the transfer job): add job=transfer after ':'. A seconds-long check of a
setup: configs/text_transfer.py:smoke,model=DIR,tasks=glue_sst2 (200 examples a split, 32 tokens).

Arguments after ':' (comma separated): model=DIR, job=nmtune|transfer, tasks=NAMES ('+'-joined
task and group names: glue, glue_sst2, glue_mnli, ..., files = every set given as files),
methods=lp+mlp+nmtune (nmtune job; also lp_aug) or lp+ridge (transfer job), pooling=cls|mean|last
('' the model's: cls for BERT and RoBERTa, last for GPT-2), max_length=N, files=NAME+NAME (more
sets to give as files), smoke. Every field is also --config.FIELD=VALUE, e.g. --config.epochs=10,
--config.text_files.imdb.text_field=review, --config.text_files.mine.train=train.jsonl.

A set given as files (config.text_files.NAME): test (its file; '' leaves the set out), and
either train (a file to train on: an id task NAME) or train_task (the task whose train split it is
an out-of-domain test of: the ood task TRAIN_TASK_to_NAME); text_field, pair_field (a pair
task's second text), label_field, label_names (the label set in class order; a file's labels are
these names or their indices). Writes DIR/results.jsonl, results.md, the plots and heads/ as the
nmtune (or transfer) job does; features are cached by the encoder's content, pooling, max_length
and tokenizer beside the encoder (DIR/features/ when its folder is not writable).
"""

from ml_collections import ConfigDict

from nmjax.config import add_encoder_fields, add_extraction_fields, check_choice, parse_arg, \
  probe_fields, tuning_config, tuning_fields

JOBS = ("nmtune", "transfer")
SENTIMENT = "negative,positive"             # GLUE's SST-2 classes, in order
NLI = "entailment,neutral,contradiction"    # GLUE's MNLI classes, in order


def text_set(*, train_task: str = "", text_field: str = "sentence", pair_field: str = "",
             label_names: str = "") -> ConfigDict:
  """One set given as files: its files (none yet), fields and label set."""
  return ConfigDict({"train": "", "test": "", "train_task": train_task,
                     "text_field": text_field, "pair_field": pair_field,
                     "label_field": "label", "label_names": label_names})


def text_sets(extra: str) -> ConfigDict:
  """GLUE-X's out-of-domain sets of the paper's pairs (SST-2 -> sentiment, MNLI -> NLI), and
  the `extra` names ('+'-joined) as sets of their own."""
  sets = ConfigDict()
  for name in ("imdb", "yelp", "amazon"):
    sets[name] = text_set(train_task="glue_sst2", label_names=SENTIMENT)
  for name in ("snli", "sick"):
    sets[name] = text_set(train_task="glue_mnli", text_field="premise", pair_field="hypothesis",
                          label_names=NLI)
  for name in filter(None, (n.strip() for n in extra.replace("+", ",").split(","))):
    sets[name] = text_set()
  return sets


def get_config(arg: str | None = None):
  args = parse_arg(arg, model="", job="nmtune", tasks="glue_sst2+glue_mnli+files", methods="",
                   pooling="", max_length=128, files="", smoke=False)
  check_choice(args, "job", JOBS)
  if args.job == "nmtune":
    config = tuning_config(tuning_fields(views="features", smoke=args.smoke),
                           methods=args.methods or "lp+mlp+nmtune", tasks=args.tasks,
                           smoke=args.smoke)
  else:
    config = ConfigDict({"job": "transfer",
                         "methods": (args.methods or "lp+ridge").replace("+", ","),
                         "probe": probe_fields(), "spectral_center": "row",
                         "zeroshot_templates": "imagenet"})
    add_encoder_fields(config, tasks=args.tasks, smoke=args.smoke)
    add_extraction_fields(config, batch_field="batch_size", smoke=args.smoke)
  config.checkpoint = args.model    # A Hugging Face folder or an import workdir of one.
  config.tasks = args.tasks.replace("+", ",")
  config.pooling = args.pooling     # '' (the model's) | cls | mean | last
  config.max_length = args.max_length  # Tokens per example (longer texts are cut).
  config.text_files = text_sets(args.files)
  if args.smoke:
    config.max_length = min(args.max_length, 32)
    config.max_examples = 200
    if args.job == "nmtune":
      config.batch_size = 32        # NMTune's rows per step: small sets fit.
      config.extract_batch_size = 40
    else:
      config.batch_size = 40
      config.probe.num_epochs = 3
  return config
