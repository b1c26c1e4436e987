"""The model zoo: tiny configs of common transformers families and two plain torch models,
every plan, each cell compared with a plain loop on the same data.

A cell is (model, plan). It either trains ``STEPS`` steps with finite losses that match
the plain loop (``TOLERANCE`` of the plan), or it is refused at check time with the
message ``EXPECTED_REFUSALS`` gives, and the model is left untouched. ``od.inspect`` must
give the same verdict as ``od.accelerate``. ``docs/models.md`` is rendered from this file
(``python -m tests.models.render_docs``) and tested to be current.

Nothing here downloads anything: every model is built from a config.
"""

from __future__ import annotations

import copy
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import overdrive as od

STEPS = 3
BATCH, SEQ, VOCAB = 4, 16, 64
LR = 0.05

# --------------------------------------------------------------------------- models


def _tf():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def _decoder_cfg(**extra) -> dict:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(extra)
    return cfg


def llama():
    tf = _tf()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_cfg()))


def qwen2():
    tf = _tf()
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_decoder_cfg()))


def mistral():
    tf = _tf()
    return tf.MistralForCausalLM(tf.MistralConfig(**_decoder_cfg(sliding_window=8)))


def gemma2():
    tf = _tf()
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(**_decoder_cfg(head_dim=16, sliding_window=8)))


def mixtral():
    tf = _tf()
    return tf.MixtralForCausalLM(tf.MixtralConfig(**_decoder_cfg(num_local_experts=4,
                                                                num_experts_per_tok=2)))


def gpt2():
    tf = _tf()
    return tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))


def bert():
    tf = _tf()
    return tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def t5():
    tf = _tf()
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1))


class EncoderLM(nn.Module):
    """A small LM on ``nn.TransformerEncoder`` (its attention is nn.MultiheadAttention)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, input_ids):
        return self.head(self.encoder(self.embed(input_ids)))


class ConvBlock(nn.Module):
    def __init__(self, ch: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class BatchNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock() for _ in range(2))
        self.head = nn.Linear(16, 10)

    def forward(self, images):
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


@dataclass(frozen=True)
class ZooModel:
    build: Callable[[], nn.Module]
    kind: str  # "causal" | "seq2seq" | "classify" | "encoder_lm" | "image"


MODELS: dict[str, ZooModel] = {
    "llama": ZooModel(llama, "causal"),
    "qwen2": ZooModel(qwen2, "causal"),
    "mistral": ZooModel(mistral, "causal"),
    "gemma2": ZooModel(gemma2, "causal"),
    "mixtral": ZooModel(mixtral, "causal"),
    "gpt2": ZooModel(gpt2, "causal"),
    "bert": ZooModel(bert, "classify"),
    "t5": ZooModel(t5, "seq2seq"),
    "encoder_lm": ZooModel(EncoderLM, "encoder_lm"),
    "cnn": ZooModel(BatchNormCNN, "image"),
}


def make_batches(kind: str, n: int = STEPS, batch: int = BATCH) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, SEQ), generator=g)
        if kind == "causal":
            out.append({"input_ids": ids, "labels": ids})
        elif kind == "seq2seq":
            out.append({"input_ids": ids,
                        "labels": torch.randint(3, VOCAB, (batch, SEQ // 2), generator=g)})
        elif kind == "classify":
            out.append({"input_ids": ids, "labels": torch.randint(0, 3, (batch,), generator=g)})
        elif kind == "encoder_lm":
            out.append({"input_ids": ids, "labels": ids})
        else:
            out.append({"images": torch.randn(batch, 3, 8, 8, generator=g),
                        "labels": torch.randint(0, 10, (batch,), generator=g)})
    return out


def loss_of(kind: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind in ("causal", "seq2seq", "classify"):
        return model(**batch).loss
    if kind == "encoder_lm":
        logits = model(batch["input_ids"])
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                           batch["labels"].flatten())
    logits = model(batch["images"])
    return nn.functional.cross_entropy(logits.float(), batch["labels"])


# --------------------------------------------------------------------------- plans

SINGLE_PLANS: dict[str, Callable[[], Any]] = {
    "compile-eager": lambda: od.Plan(compile=od.Compile(backend="eager")),
    "compile-aot_eager": lambda: od.Plan(compile=od.Compile(backend="aot_eager")),
    "ac": lambda: "ac",
    "sac": lambda: "sac",
    "compile+ac": lambda: od.Plan(compile=od.Compile(backend="aot_eager"),
                                  checkpointing=od.Checkpointing()),
    "fp8": lambda: "fp8",
    "bf16": lambda: "bf16",
    "casting": lambda: "casting",
}
DIST_PLANS: dict[str, Callable[[], Any]] = {
    "fsdp": lambda: "fsdp",
    "ddp": lambda: "ddp",
    "fsdp+tp": lambda: od.Plan(fsdp=od.FSDP(), parallel=od.Parallel(tp=2, dp_shard=1)),
    "fsdp+compile": lambda: od.Plan(fsdp=od.FSDP(), compile=od.Compile(backend="aot_eager")),
}
# sequence parallel on the transformers models' own tp plans (its own 2-rank test)
SP_PLANS: dict[str, Callable[[], Any]] = {
    "tp+sp": lambda: od.Plan(parallel=od.Parallel(tp=2, dp_shard=1, sequence_parallel=True)),
}
SP_MODELS = ("llama", "qwen2", "mixtral")
DIST_WORLD = 2

# Loss tolerance against the plain loop: relative for the low-precision plans.
TOLERANCE = {"bf16": 3e-2, "fp8": 5e-2, "casting": 5e-2}
EXACT = 1e-4

# The cells refused at check time, with the message (a regex) that says why. Every
# other cell trains and matches the plain loop.
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    ("cnn", "fp8"): r"fp8: no nn\.Linear \(or transformers Conv1D\) is eligible .*head: in_features=16, out_features=10: "
                    r"fp8 matmuls need multiples of 16",
    ("cnn", "fsdp+tp"): r"parallel\.tp=2 but the tp plan shards no module of BatchNormCNN",
    ("mixtral", "tp+sp"): r"sequence_parallel=True with grouped experts "
                          r"\(model\.layers\.0\.mlp\.experts\)",
}
# Why, in words, for docs/models.md.
REFUSAL_REASONS: dict[tuple[str, str], str] = {
    ("cnn", "fp8"): "fp8 converts Linear layers whose dims are multiples of 16; the CNN's "
                    "only Linear is its 16→10 head (convolutions have no fp8 path)",
    ("mixtral", "tp+sp"): "the expert style sums each expert's output over tp from whole "
                          "token activations; a sequence-sharded stream would need the router "
                          "and experts to gather it first (not done)",
    ("cnn", "fsdp+tp"): "no attention/MLP structure to derive a tensor-parallel plan from; "
                        "give `tp_plan` as a dict",
}


# What a trained cell did differently from the plain model, for docs/models.md (each is
# a note in that pass's record).
TRAINED_NOTES: dict[tuple[str, str], str] = {
    ("mixtral", "fsdp+tp"): "attention sharded; each expert's hidden dim is sharded "
                            "(`gate_up_proj` strided so each rank holds its gate and up "
                            "slices), the router replicated, the experts' output summed",
    ("gpt2", "fsdp+tp"): "the `Conv1D` projections are sharded; the fused `c_attn` is split "
                         "strided so each rank holds its heads' q, k and v; the tied "
                         "`wte`/`lm_head` stay whole",
    ("t5", "fsdp+tp"): "the feed-forward layers are sharded; attention stays whole (the first "
                       "block's relative position bias is computed per head)",
    ("encoder_lm", "fsdp+tp"): "linear1/linear2, the embedding and the head are sharded; "
                               "`nn.MultiheadAttention` stays whole (its input projection is a "
                               "raw parameter)",
    ("t5", "casting"): "each feed-forward `wo` stays unconverted: `T5DenseActDense` reads its "
                       "weight's dtype",
    ("encoder_lm", "casting"): "linear1/linear2 and `out_proj` stay unconverted: the fused "
                               "inference path reads their weights directly",
    ("gpt2", "casting"): "the `Conv1D` projections are cast",
    ("gpt2", "fp8"): "the `Conv1D` projections run torchao's fp8 matmul (weight layout and "
                     "keys kept); `lm_head` stays in high precision",
}


def expected(model: str, plan: str) -> str | None:
    return EXPECTED_REFUSALS.get((model, plan))


# --------------------------------------------------------------------------- a cell


@dataclass
class CellResult:
    model: str
    plan: str
    status: str  # "trained" | "refused" | "failed"
    message: str = ""
    inspect_status: str = ""  # "ok" | "refused" | "failed"
    inspect_message: str = ""
    losses: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    max_diff: float = math.nan
    untouched: bool | None = None
    buffers_agree: bool | None = None  # distributed cells: every rank's running stats equal
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _inspect_verdict(model: nn.Module, plan: Any, world_size: int) -> tuple[str, str]:
    try:
        od.inspect(model, plan, world_size=world_size)
    except od.OverdriveError as err:
        return "refused", str(err)
    except Exception as err:  # noqa: BLE001 - a raw error is a defect the test reports
        return "failed", f"{type(err).__name__}: {err}"
    return "ok", ""


def _diff(losses: list[float], reference: list[float], plan: str) -> float:
    if plan in TOLERANCE:
        return max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses, reference))
    return max(abs(a - b) for a, b in zip(losses, reference))


def passes(result: CellResult) -> bool:
    tol = TOLERANCE.get(result.plan, EXACT)
    finite = all(math.isfinite(x) for x in result.losses)
    return (result.status == "trained" and len(result.losses) == STEPS and finite
            and result.max_diff <= tol)


def _plain_losses(kind: str, model: nn.Module, batches, inference: bool, dp: int) -> list[float]:
    """The plain loop: SGD on the whole batch, the loss averaged over the ``dp`` shards a
    data-parallel run would see (BatchNorm sees each shard alone, as each rank does)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in batches:
        if inference:
            with torch.no_grad():
                losses.append(loss_of(kind, model, batch).item())
            continue
        parts = [loss_of(kind, model, shard(batch, r, dp)) for r in range(dp)]
        loss = sum(parts) / dp
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def shard(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    return {k: v.chunk(size)[rank] for k, v in batch.items()}


def run_cell(model_name: str, plan_name: str, plan: Any, *, world_size: int = 1,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             buffers_agree: Callable[[nn.Module], bool] | None = None) -> CellResult:
    """One cell, on this process (a rank of a ``world_size`` launch for the dist plans)."""
    from tests.helpers import assert_untouched, snapshot

    spec = MODELS[model_name]
    inference = plan_name == "casting"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = spec.build()
    reference = copy.deepcopy(model)
    res = CellResult(model_name, plan_name, "failed")
    res.inspect_status, res.inspect_message = _inspect_verdict(model, plan, world_size)
    before = snapshot(model)
    optimizer = None if inference else (lambda p: torch.optim.SGD(p, lr=LR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rt = od.accelerate(model, plan, optimizer=optimizer)
    except od.PassFailed as err:
        res.message = f"PassFailed: {err}"
        res.seconds = time.perf_counter() - t0
        return res
    except od.OverdriveError as err:
        res.status, res.message = "refused", str(err)
        try:
            assert_untouched(model, before)
            res.untouched = True
        except AssertionError:
            res.untouched = False
        res.seconds = time.perf_counter() - t0
        return res
    except Exception as err:  # noqa: BLE001
        res.message = f"{type(err).__name__}: {err}"
        return res
    batches = make_batches(spec.kind)
    dp = rt.dp_size if world_size > 1 else 1
    try:
        if inference:
            rt.model.eval()
        for batch in batches:
            local = shard(batch, rt.dp_rank, dp) if dp > 1 else batch
            if inference:
                with torch.no_grad():
                    loss = loss_of(spec.kind, rt.model, local).detach().float()
            else:
                loss = loss_of(spec.kind, rt.model, local)
                rt.backward(loss)
                rt.optimizer.step()
                rt.optimizer.zero_grad()
                loss = loss.detach().float()
            if reduce is not None and dp > 1:
                loss = reduce(loss) / dp
            res.losses.append(loss.item())
    except Exception as err:  # noqa: BLE001 - a run-time failure after a clean check
        res.message = f"{type(err).__name__}: {str(err)[:500]}"
        res.seconds = time.perf_counter() - t0
        return res
    if buffers_agree is not None:
        res.buffers_agree = buffers_agree(rt.model)
    if inference:
        reference.eval()
    res.reference = _plain_losses(spec.kind, reference, batches, inference, dp)
    res.status = "trained"
    res.max_diff = _diff(res.losses, res.reference, plan_name)
    res.seconds = time.perf_counter() - t0
    return res


def verdict_agrees(res: CellResult) -> bool:
    """inspect says ok exactly when accelerate trains; refused exactly when it refuses."""
    return (res.inspect_status == "ok") == (res.status == "trained") and \
        (res.inspect_status == "refused") == (res.status == "refused")


def check_cell(res: CellResult) -> None:
    """The assertions every cell must pass (in a test, or on rank 0 of a launch)."""
    want = expected(res.model, res.plan)
    where = f"{res.model} × {res.plan}"
    if want is None:
        assert res.status == "trained", f"{where}: expected to train, got {res.status}: " \
                                        f"{res.message}"
        assert passes(res), f"{where}: losses {res.losses} vs plain {res.reference} " \
                            f"(max diff {res.max_diff})"
        assert res.buffers_agree is not False, f"{where}: ranks hold different buffers"
    else:
        assert res.status == "refused", f"{where}: expected a refusal, got {res.status}: " \
                                        f"{res.message}"
        assert re.search(want, res.message), f"{where}: refusal {res.message!r} !~ {want!r}"
        assert res.untouched, f"{where}: a refused plan changed the model"
    assert verdict_agrees(res), (f"{where}: inspect says {res.inspect_status} "
                                 f"({res.inspect_message}) but accelerate {res.status} "
                                 f"({res.message})")
