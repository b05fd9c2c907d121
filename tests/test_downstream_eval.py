"""Downstream evaluation end to end: a tiny model that memorized a few QA pairs answers them
through seqio.Evaluator, the cached decoder and the exact-match metric."""
import json
import os
import sys

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from data_pipelines import downstream
from doremi_jax import downstream_eval
from doremi_jax import optim
from doremi_jax import steps
from doremi_jax import trainer as trainer_lib
from doremi_jax.model import TransformerConfig
from tests import helpers

TASK = "test_memorized_qa"
PAIRS = [("red fruit?", ["apple", "cherry"]), ("sky?", ["blue"]), ("cold?", ["ice"]),
         ("loud?", ["drum"])]
LENGTHS = {"inputs": 48, "targets": 16}
CFG = TransformerConfig(vocab_size=helpers.VOCAB, emb_dim=64, num_heads=2, head_dim=32,
                        num_layers=2, mlp_dim=128, max_len=64)


def _register():
  """A one-shot QA task over PAIRS (WebQuestions' fields), its shots drawn from PAIRS too."""

  def dataset_fn(split, shuffle_files=False, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({
        "question": [q for q, _ in PAIRS],
        "answers": tf.ragged.constant([a for _, a in PAIRS])
    }).map(lambda ex: {
        "question": ex["question"],
        "answers": ex["answers"]
    })

  pool = {"question": [q for q, _ in PAIRS], "answer": [a[0] for _, a in PAIRS]}
  downstream.register_one_shot_task(TASK, seqio.FunctionDataSource(dataset_fn,
                                                                   splits=["validation"]),
                                    benchmark="web_questions", pool_fn=lambda: pool)


def _memorize_batch():
  """Each example's prompt + answer + EOS as one training sequence, as the task builds it."""
  ds = seqio.get_mixture_or_task(TASK).get_dataset(LENGTHS, split="validation", shuffle=False)
  texts = [np.concatenate([ex["inputs"], ex["targets"]]) for ex in ds.as_numpy_iterator()]
  batch = helpers.empty_batch(8, CFG.max_len)
  for row in range(8):
    helpers.put_example(batch, row, 0, texts[row % len(texts)], segment=1)
  return batch


@pytest.fixture(scope="module")
def trained():
  _register()
  mesh_trainer = trainer_lib.build_trainer(
      model_cfg=CFG,
      mesh=jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1),
                             ("data", "fsdp", "model")), global_batch_size=8, seq_len=CFG.max_len,
      total_steps=300, step_cfg=steps.StepConfig(num_domains=1),
      opt_cfg=optim.OptimizerConfig(name="adamw", peak_lr=1e-2, final_lr=1e-3, weight_decay=0.0))
  state = mesh_trainer.init_fn(jax.random.key(0))
  initial = jax.device_get(state.params)  # the steps donate (delete) the state's buffers
  batch = mesh_trainer.make_batch(_memorize_batch())
  for _ in range(300):
    state, metrics = jax.block_until_ready(mesh_trainer.step_fn(state, batch))
  assert float(metrics["loss"]) < 0.2, "the tiny model did not memorize its 4 sequences"
  return mesh_trainer, initial, state.params


def _evaluator(mesh):
  cfg = downstream_eval.DownstreamConfig(suite=None, tasks=[TASK], inputs_length=48,
                                         targets_length=16, batch_size=8)
  return downstream_eval.DownstreamEvaluator(cfg, model_cfg=CFG, mesh=mesh,
                                             vocabulary=seqio.ByteVocabulary())


def test_memorized_pairs_reach_exact_match_one(trained, tmp_path):
  trainer, initial, params = trained
  evaluator = _evaluator(trainer.mesh)
  result = evaluator.run(params, 300, str(tmp_path))
  assert result["tasks"] == {TASK: 100.0} and result["average"] == 100.0
  assert result["examples"] == {TASK: 4} and result["step"] == 300
  assert downstream_eval.read_history(str(tmp_path)) == [result]
  # The untrained model answers none of them: the metric can fail.
  assert evaluator.evaluate(initial)["tasks"][TASK] == 0.0


def test_prompt_tokens_are_the_inputs(trained):
  del trained
  task = seqio.get_mixture_or_task(TASK)
  ds = task.get_dataset(LENGTHS, split="validation", shuffle=False)
  converted = seqio.PrefixLMFeatureConverter(pack=False)(ds, LENGTHS)
  for ex, conv in zip(ds.as_numpy_iterator(), converted.as_numpy_iterator()):
    assert downstream_eval.prompt_tokens(conv) == [0] + ex["inputs"].tolist()


def test_bad_downstream_config_is_refused():
  with pytest.raises(ValueError, match="suite='pile'"):
    downstream_eval.DownstreamConfig(suite="pile").validate()
  with pytest.raises(ValueError, match="needs DownstreamConfig.tasks"):
    downstream_eval.DownstreamConfig(suite=None).validate()
  with pytest.raises(ValueError, match="not a registered SeqIO task"):
    downstream_eval.register_tasks(
        downstream_eval.DownstreamConfig(suite=None, tasks=["no_such_task"]), None)


def test_missing_tfds_dataset_fails_before_compute(tmp_path):
  cfg = downstream_eval.DownstreamConfig(tasks=["triviaqa"], tfds_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tfds build trivia_qa/unfiltered.nocontext"):
    downstream_eval.register_tasks(cfg, seqio.ByteVocabulary())


def _evaluate_cmd(model_dir, *bindings):
  return [
      sys.executable, "-m", "doremi_jax.evaluate", "--gin_file=runs/downstream.gin",
      f"--gin.MODEL_DIR='{model_dir}'", "--gin.evaluate.mesh_shape=(1, 1, 1)", *bindings
  ]


def test_evaluate_cli_writes_downstream_json_or_names_tfds_build(tmp_path):
  """`doremi_jax.evaluate --gin_file=runs/downstream.gin` on a trained run: the paper's tasks
  without prepared data fail in one line naming `tfds build`, before the checkpoint is read;
  the demo suite writes downstream.json with the checkpoint step."""
  model_dir = tmp_path / "run"
  helpers.run([sys.executable, *helpers.train_args(model_dir, 2)], env=helpers.child_env(devices=1))
  env = {**helpers.child_env(devices=1), "TFDS_DATA_DIR": str(tmp_path / "no_tfds")}
  missing = helpers.run(_evaluate_cmd(model_dir), env=env, check=False)
  assert missing.returncode != 0
  assert "tfds build trivia_qa/unfiltered.nocontext" in missing.stderr
  assert "Traceback" not in missing.stderr
  helpers.run(
      _evaluate_cmd(model_dir, "--gin.DownstreamConfig.suite='demo'",
                    "--gin.DownstreamConfig.max_examples=4", "--gin.DownstreamConfig.batch_size=4",
                    "--gin.DownstreamConfig.inputs_length=112",
                    "--gin.DownstreamConfig.targets_length=16"), env=helpers.child_env(devices=1))
  with open(os.path.join(model_dir, "downstream.json")) as f:
    result = json.load(f)
  assert result["step"] == 2 and set(result["tasks"]) == {"demo_unicode", "demo_cloze"}
  assert result["examples"] == {"demo_unicode": 4, "demo_cloze": 4}
  assert 0.0 <= result["average"] <= 100.0
  assert not os.path.exists(os.path.join(model_dir, "eval.json"))  # perplexity=False


def test_downstream_history_on_resume(tmp_path):
  """train.downstream every 2 steps: a run stopped at step 2, whose step-2 evaluation was lost
  (killed between the checkpoint and the evaluation) and which left a record past its
  checkpoint, resumes to evaluate step 2 again, drops the stale record and goes on to 4."""
  model_dir = tmp_path / "run"
  flags = [
      "--gin.train.downstream=@DownstreamConfig()", "--gin.DownstreamConfig.suite='demo'",
      "--gin.DownstreamConfig.max_examples=2", "--gin.DownstreamConfig.batch_size=2",
      "--gin.DownstreamConfig.inputs_length=112", "--gin.DownstreamConfig.targets_length=8",
      "--gin.DownstreamConfig.every=2", "--gin.MESH_SHAPE=(1, 1, 1)",
      "--gin.train.checkpoint_every=2"
  ]
  env = helpers.child_env(devices=1)
  helpers.run([
      sys.executable,
      *helpers.train_args(model_dir, 4, extra=flags + ["--gin.train.stop_after_steps=2"])
  ], env=env)
  history = model_dir / "downstream_history.jsonl"
  records = helpers.read_jsonl(history)
  assert [r["step"] for r in records] == [2] and records[0]["suite"] == "demo"
  history.write_text(json.dumps({**records[0], "step": 3}) + "\n")  # lost 2, stale 3
  helpers.run([sys.executable, *helpers.train_args(model_dir, 4, extra=flags)], env=env)
  records = helpers.read_jsonl(history)
  assert [r["step"] for r in records] == [2, 4]
  assert set(records[-1]["tasks"]) == {"demo_unicode", "demo_cloze"}
