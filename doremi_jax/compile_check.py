"""Compile a run's step for a TPU topology on this host; report per-chip memory and FLOPs.

  python -m doremi_jax.compile_check --gin_file=gin/runs/doremi.gin \
      --gin_file=gin/models/280m.gin --topology=v5e:4x4 [--gin.BATCH_SIZE=256]

libtpu describes the topology (jax.experimental.topologies), the mesh is made over its
abstract devices, and the jitted step is lowered with abstract, sharded arguments and
compiled by the TPU compiler. Nothing runs and no TPU is needed. Exit status: 0 when the
step fits in the chip's HBM, 1 when it does not, 2 on bad input.
"""
import argparse
import dataclasses
import os
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
  two_d = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
           256: "16x16"}
  three_d = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
             512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}
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

  @property
  def total_bytes(self) -> int:
    """Live at once: arguments + outputs (less donated buffers reused) + temporaries + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes

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
    if self.peak_bytes:
      lines.append(f"  (XLA peak estimate {self.peak_bytes / GiB:.3f} GiB)")
    lines.append(f"step FLOPs: {self.flops_per_device:.3e} per chip, {total_flops:.3e} total; "
                 f">= {1e3 * self.flops_per_device / (chip['tflops'] * 1e12):.2f} ms/step at "
                 f"{chip['tflops']:g} TFLOP/s peak")
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


def analyze(compiled, *, topology: str, family: str, num_devices: int, mesh_shape: dict,
            step: str, description: str = "") -> Report:
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


def _on_mesh(sharding, mesh) -> bool:
  return getattr(sharding, "mesh", None) is not None and \
      set(sharding.device_set) == set(mesh.devices.flat)


def _step_for_compile(trainer):
  """trainer.step_fn and its abstract arguments, all on the trainer's mesh.

  If some state shardings are not on the mesh (optimizer-state shardings read from an
  unconstrained jit(tx.init) come back on the default CPU device), optimizer leaves take
  their parameter's sharding and the rest are replicated, and the step is jitted again with
  the same settings.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from doremi_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from doremi_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  mesh = trainer.mesh
  state_sh = trainer.state_shardings
  if all(_on_mesh(s, mesh) for s in jax.tree.leaves(state_sh)):
    return trainer.step_fn, trainer_lib.abstract_step_args(trainer)
  repl = sharding_lib.replicated(mesh)
  params = trainer.abstract_state.params

  def like_param(leaf, param, param_sh):
    return param_sh if getattr(leaf, "shape", None) == param.shape else repl

  opt_sh = optax.tree_map_params(trainer.tx, like_param, trainer.abstract_state.opt_state,
                                 params, state_sh.params, transform_non_params=lambda _: repl)
  fix = lambda s: s if _on_mesh(s, mesh) else repl
  state_sh = jax.tree.map(fix, state_sh.replace(opt_state=opt_sh))
  strip = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.tree.map(strip, trainer.abstract_state), state_sh)
  fn = trainer.step_fn.__wrapped__
  if trainer.is_doremi:
    in_sh = (state_sh, trainer.ref_shardings, trainer.batch_sharding)
    args = (abstract_state, trainer.abstract_ref_params, trainer.abstract_batch)
  else:
    in_sh = (state_sh, trainer.batch_sharding)
    args = (abstract_state, trainer.abstract_batch)
  step = jax.jit(fn, in_shardings=in_sh, out_shardings=(state_sh, repl), donate_argnums=(0,))
  return step, args


def check_trainer(trainer, *, topology: str, family: str, which: str = "train",
                  description: str = "") -> Report:
  """Lowers and compiles the trainer's step (or eval step) and returns its Report."""
  if which == "eval":
    fn = trainer.eval_fn
    args = (trainer.abstract_state.params, trainer.abstract_batch)
    step = "eval step"
  else:
    fn, args = _step_for_compile(trainer)
    step = "proxy step (DoReMi, with reference)" if trainer.is_doremi else "train step"
  compiled = fn.lower(*args).compile()
  return analyze(compiled, topology=topology, family=family,
                 num_devices=trainer.mesh.devices.size, mesh_shape=dict(trainer.mesh.shape),
                 step=step, description=description)


def _describe(trainer, batch: int, seq_len: int) -> str:
  cfg = trainer.model_cfg
  text = f"model {cfg.num_params() / 1e6:.1f}M params"
  if trainer.is_doremi:
    text += f", reference {trainer.ref_model_cfg.num_params() / 1e6:.1f}M params"
  return (text + f", batch {batch} x {seq_len} tokens, accum_steps "
          f"{trainer.step_cfg.accum_steps}, compute {cfg.dtype}")


def check_config(*, topology: str, model_cfg, global_batch_size: int, seq_len: int,
                 step_cfg, ref_model_cfg=None, mesh_shape: Sequence[int] = (1, -1, 1),
                 total_steps: int = 1000, which: str = "train") -> Report:
  """Builds a trainer on the topology's abstract devices and checks its step."""
  from doremi_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from doremi_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  canonical, family, _ = parse_topology(topology)
  devices, family = topology_devices(canonical)
  mesh = sharding_lib.make_mesh(mesh_shape, devices=devices)
  trainer = trainer_lib.build_trainer(
      model_cfg=model_cfg, mesh=mesh, global_batch_size=global_batch_size, seq_len=seq_len,
      total_steps=total_steps, step_cfg=step_cfg, ref_model_cfg=ref_model_cfg)
  return check_trainer(trainer, topology=canonical, family=family, which=which,
                       description=_describe(trainer, global_batch_size, seq_len))


# ------------------------------------------------------------------ command line


def _macro(name: str, default: Any = None) -> Any:
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    return default


def check_from_gin(topology: Optional[str], which: str = "train") -> Report:
  """Checks the run that the parsed gin config describes."""
  from doremi_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  topology = topology or _macro("TOPOLOGY")
  if not topology:
    raise TopologyError("no topology: pass --topology=v5e:4x4 (or a gin/hardware/*.gin file "
                        f"that sets TOPOLOGY). Examples: {', '.join(EXAMPLES)}.")
  canonical, family, _ = parse_topology(topology)
  devices, family = topology_devices(canonical)
  mesh_shape = _macro("MESH_SHAPE")
  trainer, batch, seq_len = train_lib.build_trainer_from_gin(devices=devices,
                                                             mesh_shape=mesh_shape)
  return check_trainer(trainer, topology=canonical, family=family, which=which,
                       description=_describe(trainer, batch, seq_len))


def _parse_args(argv: Sequence[str]):
  parser = argparse.ArgumentParser(
      prog="python -m doremi_jax.compile_check",
      description="Compile a run's step for a TPU topology on this host and report per-chip "
                  "memory and FLOPs. Extra --gin.NAME=VALUE flags bind gin parameters.")
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  parser.add_argument("--gin_search_paths", default="", help="comma-separated gin search paths")
  parser.add_argument("--topology", default=None,
                      help="e.g. v5e:4x4, v4:2x2x4 or v5litepod-16 (default: gin TOPOLOGY)")
  parser.add_argument("--step", choices=("train", "eval"), default="train",
                      help="train: the run's train or proxy step; eval: the eval step")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for item in rest:
    m = re.fullmatch(r"--gin\.([^=]+)=(.*)", item, re.S)
    if not m:
      parser.error(f"unrecognized argument {item!r} (gin bindings are --gin.NAME=VALUE)")
    bindings.append(f"{m.group(1)} = {m.group(2)}")
  return args, bindings


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, bindings = _parse_args(sys.argv[1:] if argv is None else argv)
  import gin  # pylint: disable=g-import-not-at-top
  for path in filter(None, args.gin_search_paths.split(",")):
    gin.add_config_file_search_path(path)
  gin.add_config_file_search_path(os.getcwd())
  try:
    if args.topology:
      parse_topology(args.topology)  # fail fast, before parsing gin and importing models
    gin.parse_config_files_and_bindings(args.gin_file, bindings)
    report = check_from_gin(args.topology, which=args.step)
  except TopologyError as e:
    print(f"compile_check: error: {e}", file=sys.stderr)
    return 2
  print(report.format())
  return 0 if report.fits else 1


if __name__ == "__main__":
  sys.exit(main())
