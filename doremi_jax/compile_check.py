"""Compile a run's step for a TPU topology on this host; report per-chip memory and FLOPs.

  doremi-compile-check --gin_file=gin/runs/doremi.gin \
      --gin_file=gin/models/280m.gin --topology=v5e:4x4 [--gin.BATCH_SIZE=256]

libtpu describes the topology (jax.experimental.topologies), the mesh is made over its
abstract devices, and the jitted step is lowered with abstract, sharded arguments and
compiled by the TPU compiler. Nothing runs and no TPU is needed. Exit status: 0 when the
step fits in the chip's HBM, 1 when it does not, 2 on bad input.
"""
import dataclasses
import re
import sys
from typing import Any, Optional, Sequence

GiB = 1024**3

# Per JAX device: v2/v3 expose each TensorCore as a device; v4 and v5p are megacore
# (one device per chip). HBM in GiB, peak bf16 TFLOP/s.
CHIPS = {
    "v2": dict(hbm_gib=8, tflops=22.5, kind="TPU v2 (per core)"),
    "v3": dict(hbm_gib=16, tflops=61.5, kind="TPU v3 (per core)"),
    "v4": dict(hbm_gib=32, tflops=275, kind="TPU v4"),
    "v5e": dict(hbm_gib=16, tflops=197, kind="TPU v5e"),
    "v5p": dict(hbm_gib=95, tflops=459, kind="TPU v5p"),
    "v6e": dict(hbm_gib=32, tflops=918, kind="TPU v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
EXAMPLES = ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:16x16", "v4:2x2x1", "v4:2x2x4", "v4:4x4x4",
            "v5p:2x2x1", "v6e:2x4", "v3:4x4", "v2:2x2", "or an accelerator type: v5litepod-16, "
            "v4-32")


class TopologyError(ValueError):
  pass


def _topology_error(name: str, why: str = "") -> TopologyError:
  why = f" ({why})" if why else ""
  return TopologyError(f"unknown TPU topology {name!r}{why}. Use FAMILY:AxB (v2, v3, v5e, v6e) "
                       f"or FAMILY:AxBxC (v4, v5p), e.g. {', '.join(EXAMPLES)}.")


def _from_accelerator_type(name: str) -> Optional[str]:
  """v5litepod-16 -> v5e:4x4, v4-32 -> v4:2x2x4 (v4/v5p sizes count TensorCores)."""
  m = re.fullmatch(r"(v5litepod|v5e|v6e|v5p|v4|v3|v2)-(\d+)", name)
  if not m:
    return None
  family, n = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
  two_d = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
  three_d = {
      8: "2x2x1",
      16: "2x2x2",
      32: "2x2x4",
      64: "2x4x4",
      128: "4x4x4",
      256: "4x4x8",
      512: "4x8x8",
      1024: "8x8x8",
      2048: "8x8x16",
      4096: "8x16x16"
  }
  if family in ("v5e", "v6e"):
    shape = two_d.get(n)
  elif family in ("v4", "v5p"):
    shape = three_d.get(n)
  else:  # v2/v3: n cores, 2 per chip, 4 chips per host.
    shape = {8: "2x2", 32: "4x4", 128: "8x8", 256: "8x16", 512: "16x16"}.get(n)
  return f"{family}:{shape}" if shape else None


def parse_topology(name: str):
  """Returns (canonical name, family, chip grid) for e.g. 'v5e:4x4' or 'v4-32'."""
  name = name.strip()
  converted = _from_accelerator_type(name)
  if converted:
    name = converted
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", name)
  if not m:
    raise _topology_error(name)
  family = _ALIASES.get(m.group(1), m.group(1))
  if family not in CHIPS:
    raise _topology_error(name, f"no TPU family {m.group(1)!r}")
  grid = tuple(int(x) for x in m.group(2).split("x"))
  want = 3 if family in ("v4", "v5p") else 2
  if len(grid) != want or min(grid) < 1:
    raise _topology_error(name, f"{family} takes {want} dimensions")
  return f"{family}:{m.group(2)}", family, grid


def topology_devices(name: str):
  """(abstract TPU devices, family) for a topology name, built by libtpu on this host."""
  canonical, family, grid = parse_topology(name)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if family in ("v4", "v5p"):
    kwargs["chip_config_name"] = "megacore"  # one JAX device per chip, as on the VMs.
  chips = 1
  for g in grid:
    chips *= g
  if family in ("v5e", "v6e") and chips <= 8:
    # Slices up to 8 chips are one host (v5litepod-8 is 2x4 on one VM).
    kwargs["chips_per_host_bounds"] = (grid[0], grid[1], 1)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=canonical, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise _topology_error(name, str(e).splitlines()[0][:200]) from e
  return list(desc.devices), family


@dataclasses.dataclass
class Report:
  """Per-chip figures of one compiled step."""
  topology: str
  family: str
  num_devices: int
  mesh_shape: dict
  step: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  peak_bytes: int
  flops_per_device: float
  hbm_bytes: int
  description: str = ""
  compiler_error: str = ""  # the TPU compiler's out-of-memory message, if it gave up

  @property
  def total_bytes(self) -> int:
    """Live at once: arguments + outputs (less donated buffers reused) + temporaries + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes +
            self.code_bytes)

  @property
  def fits(self) -> bool:
    return not self.compiler_error and self.total_bytes <= self.hbm_bytes

  def format(self) -> str:
    gib = lambda b: f"{b / GiB:9.3f} GiB"
    chip = CHIPS[self.family]
    mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    total_flops = self.flops_per_device * self.num_devices
    lines = [
        f"compile check: {self.step} on {self.topology} ({self.num_devices} x {chip['kind']}, "
        f"mesh {mesh})",
    ]
    if self.description:
      lines.append(f"  {self.description}")
    lines += [
        "per-chip memory:",
        f"  arguments         {gib(self.argument_bytes)}",
        f"  outputs           {gib(self.output_bytes)}",
        f"  aliased (donated) {gib(-self.alias_bytes)}",
        f"  temporaries       {gib(self.temp_bytes)}",
        f"  generated code    {gib(self.code_bytes)}",
        f"  total             {gib(self.total_bytes)}  of {self.hbm_bytes / GiB:.2f} GiB HBM "
        f"({100.0 * self.total_bytes / self.hbm_bytes:.1f}%)",
    ]
    if self.peak_bytes and not self.compiler_error:
      lines.append(f"  (XLA peak estimate {self.peak_bytes / GiB:.3f} GiB)")
    if self.compiler_error:
      lines.append(f"  the TPU compiler gave up: {self.compiler_error}")
    if self.compiler_error and not self.flops_per_device:
      lines.append("step FLOPs: unknown (not compiled)")
    else:
      lines.append(f"step FLOPs: {self.flops_per_device:.3e} per chip, {total_flops:.3e} "
                   f"total; >= {1e3 * self.flops_per_device / (chip['tflops'] * 1e12):.2f} "
                   f"ms/step at {chip['tflops']:g} TFLOP/s peak")
    if self.fits:
      lines.append("FITS")
    else:
      over = (self.total_bytes - self.hbm_bytes) / GiB
      lines.append(f"DOES NOT FIT: needs {self.total_bytes / GiB:.2f} GiB per chip, "
                   f"{over:.2f} GiB over the {self.hbm_bytes / GiB:.0f} GiB of HBM")
    return "\n".join(lines)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def analyze(compiled, *, topology: str, family: str, num_devices: int, mesh_shape: dict, step: str,
            description: str = "") -> Report:
  """A Report from a compiled executable's memory and cost analyses."""
  mem = compiled.memory_analysis()
  if isinstance(mem, (list, tuple)):
    mem = mem[0]
  get = lambda field: int(getattr(mem, field, 0) or 0)
  return Report(topology=topology, family=family, num_devices=num_devices, mesh_shape=mesh_shape,
                step=step, argument_bytes=get("argument_size_in_bytes"),
                output_bytes=get("output_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"),
                temp_bytes=get("temp_size_in_bytes"),
                code_bytes=get("generated_code_size_in_bytes"),
                peak_bytes=get("peak_memory_in_bytes"), flops_per_device=_flops(compiled),
                hbm_bytes=int(CHIPS[family]["hbm_gib"] * GiB), description=description)


_SIZE = r"([0-9.]+)\s*([KMGT]i?B?|B)?"
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _to_bytes(number: str, unit: Optional[str]) -> int:
  return int(float(number) * _UNITS[(unit or "")[:1]])


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def oom_report(message: str, args, donated, *, topology: str, family: str, num_devices: int,
               mesh_shape: dict, step: str, description: str = "") -> Report:
  """A not-fitting Report from the TPU compiler's RESOURCE_EXHAUSTED message.

  Arguments come from the abstract arguments' shards; temporaries (and the total, when the
  message gives it) from the message.
  """
  message = " ".join(message.split())
  args_b = _per_device_bytes(args)
  donated_b = _per_device_bytes(donated)
  temp_b = 0
  m = re.search(r"temporaries\s*\(" + _SIZE + r"\)", message)
  if m:
    temp_b = _to_bytes(m.group(1), m.group(2))
  m = re.search(r"Used\s+" + _SIZE + r"\s+of\s+" + _SIZE, message)
  if m and not temp_b:
    temp_b = max(_to_bytes(m.group(1), m.group(2)) - args_b, 0)
  first = message.split(". ")[0].replace("RESOURCE_EXHAUSTED: ", "")
  return Report(topology=topology, family=family, num_devices=num_devices, mesh_shape=mesh_shape,
                step=step, argument_bytes=args_b, output_bytes=donated_b, alias_bytes=donated_b,
                temp_bytes=temp_b, code_bytes=0, peak_bytes=0, flops_per_device=0.0,
                hbm_bytes=int(CHIPS[family]["hbm_gib"] * GiB), description=description,
                compiler_error=first[:300])


def check_trainer(trainer, *, topology: str, family: str, which: str = "train",
                  description: str = "", downstream=None) -> Report:
  """Lowers and compiles the trainer's step (or eval step, or with `downstream`, a
  DownstreamConfig, the greedy decoding of its batch) and returns its Report."""
  lowered = None
  if which == "decode":
    from doremi_jax import decoding  # pylint: disable=g-import-not-at-top
    decoder = decoding.Decoder(trainer.model_cfg, trainer.mesh, batch_size=downstream.batch_size,
                               max_prompt_len=downstream.inputs_length + 1,
                               max_decode_len=downstream.targets_length)
    args = (trainer.abstract_state.params,)
    lowered = decoder.lowered(*args)
    step = (f"greedy decoding with a KV cache ({downstream.batch_size} prompts of "
            f"{downstream.inputs_length} + {downstream.targets_length} tokens)")
  elif which == "eval":
    fn = trainer.eval_fn
    args = (trainer.abstract_state.params, trainer.abstract_batch)
    step = "eval step"
  else:
    from doremi_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
    fn, args = trainer.step_fn, trainer_lib.abstract_step_args(trainer)
    step = _step_name(trainer)
  where = dict(topology=topology, family=family, num_devices=trainer.mesh.devices.size,
               mesh_shape=dict(trainer.mesh.shape), step=step, description=description)
  lowered = lowered or fn.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    donated = args[0] if which == "train" else ()
    return oom_report(str(e), args, donated, **where)
  return analyze(compiled, **where)


def _step_name(trainer) -> str:
  online = trainer.step_cfg.online
  if online is not None:
    return f"online step ({online.method}" + (", with reference)" if trainer.is_doremi else ")")
  return "proxy step (DoReMi, with reference)" if trainer.is_doremi else "train step"


def _describe(trainer, batch: int, seq_len: int) -> str:
  cfg = trainer.model_cfg
  text = f"model {cfg.num_params() / 1e6:.1f}M params"
  if trainer.is_doremi:
    text += f", reference {trainer.ref_model_cfg.num_params() / 1e6:.1f}M params"
  return (text + f", batch {batch} x {seq_len} tokens, accum_steps "
          f"{trainer.step_cfg.accum_steps}, compute {cfg.dtype}, attention {cfg.attention_impl}, "
          f"remat {cfg.remat}, logits_chunk {cfg.logits_chunk}")


def check_config(cfg, *, topology: str, which: str = "train", num_domains: Optional[int] = None,
                 ref_model_cfg=None, num_hosts: Optional[int] = None,
                 description: str = "") -> Report:
  """Builds a run.RunConfig's run on the topology's abstract devices and checks its step.

  num_domains stands in for a mixture not registered here; ref_model_cfg is the reference's
  size for DoReMi runs (default: the proxy's); num_hosts defaults to the topology's.
  """
  from doremi_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  canonical, family, _ = parse_topology(topology)
  devices, family = topology_devices(canonical)
  hosts = num_hosts or len({d.process_index for d in devices})
  run = run_lib.build_run(cfg, devices=devices, num_processes=hosts, abstract=True,
                          num_domains=num_domains, ref_model_cfg=ref_model_cfg)
  text = _describe(run.trainer, cfg.batch_size, cfg.seq_len) + f", {hosts} host(s)"
  return check_trainer(run.trainer, topology=canonical, family=family, which=which,
                       description=text + description, downstream=cfg.downstream)


# ------------------------------------------------------------------ command line

_PILE_DOMAINS = 22


def _num_domains(mixture, override: Optional[int]) -> tuple[int, str]:
  if override:
    return override, ""
  if mixture is not None:
    try:
      from doremi_jax import data as data_lib  # pylint: disable=g-import-not-at-top
      return len(data_lib.domain_names(mixture)), ""
    except Exception:  # pylint: disable=broad-except  # not registered on this host
      pass
  return _PILE_DOMAINS, f"; {_PILE_DOMAINS} domains assumed (--num_domains to change)"


def _reference_config(reference_dir: Optional[str], model_cfg) -> tuple[Any, str]:
  """The reference run's model (from its run info, when readable), else the proxy's."""
  if reference_dir:
    try:
      from doremi_jax import outputs  # pylint: disable=g-import-not-at-top
      from doremi_jax.model import config_from_info  # pylint: disable=g-import-not-at-top
      info = outputs.read_run_info(reference_dir)
      if info:
        return config_from_info(info["model"]), ""
    except Exception:  # pylint: disable=broad-except
      pass
  return model_cfg, "; reference assumed the size of the proxy"


def _macro(name: str, default: Any = None) -> Any:
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    return default


def check_from_gin(topology: Optional[str], which: str = "train",
                   num_domains: Optional[int] = None) -> Report:
  """Checks the run that the parsed gin config describes (the `train` bindings)."""
  from doremi_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  topology = topology or _macro("TOPOLOGY")
  if not topology:
    raise TopologyError("no topology: pass --topology=v5e:4x4 (or a gin/hardware/*.gin file "
                        f"that sets TOPOLOGY). Examples: {', '.join(EXAMPLES)}.")
  cfg = train_lib.run_config()
  if cfg.train_steps is None:  # only the schedule's shape depends on it
    cfg = dataclasses.replace(cfg, train_steps=1000)
  if which == "eval" and cfg.eval_batch_size:
    cfg = dataclasses.replace(cfg, batch_size=cfg.eval_batch_size)
  if which == "decode" and cfg.downstream is None:
    raise ValueError("--step=decode checks train.downstream's decoding: bind "
                     "train.downstream = @DownstreamConfig() (and its batch and lengths).")
  k, note = _num_domains(cfg.mixture_or_task_name, num_domains)
  ref_cfg = None
  if cfg.doremi is not None:
    ref_cfg, ref_note = _reference_config(cfg.reference_dir, cfg.model)
    note += ref_note
  return check_config(cfg, topology=topology, which=which, num_domains=k, ref_model_cfg=ref_cfg,
                      description=note)


def _extra_flags(parser):
  parser.add_argument("--topology", default=None,
                      help="e.g. v5e:4x4, v4:2x2x4 or v5litepod-16 (default: gin TOPOLOGY)")
  parser.add_argument(
      "--step", choices=("train", "eval", "decode"), default="train",
      help="train: the run's train or proxy step; eval: its eval step; "
      "decode: train.downstream's greedy decoding")
  parser.add_argument("--num_domains", type=int, default=None,
                      help="domains (default: the mixture's, when registered here; else 22)")


def main(argv: Optional[Sequence[str]] = None) -> int:
  import logging  # pylint: disable=g-import-not-at-top
  from doremi_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.quiet_logging()
  logging.getLogger().setLevel(logging.WARNING)
  args, bindings = config_lib.parse_flags(sys.argv[1:] if argv is None else argv, _extra_flags,
                                          description=__doc__)
  try:
    if args.topology:
      parse_topology(args.topology)  # fail fast, before parsing gin and building models
    config_lib.parse_gin(args.gin_file, bindings, args.gin_search_paths)
    report = check_from_gin(args.topology, which=args.step, num_domains=args.num_domains)
  except ValueError as e:  # TopologyError included
    print(f"compile_check: error: {e}", file=sys.stderr)
    return 2
  print(report.format())
  return 0 if report.fits else 1


if __name__ == "__main__":
  from doremi_jax import quiet as _quiet  # pylint: disable=g-import-not-at-top
  _quiet.quiet_start()
  sys.exit(main())
