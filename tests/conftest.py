"""Tiny real models and transcoders, built and saved by the tests in the formats users bring.

The models are genuine Hugging Face GPT-2 and Llama checkpoints (random weights, `save_pretrained`
layout with a real tokenizer), loaded through the same code path as any local model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (
    "the a of and to in is was he she it that for on with as his her they at by this from had not "
    "are but have one all were we when there can an which their said if do will each about how up out "
    "them then many some so these would other into has more two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know paris france capital city river jury county court report "
    "election money tax state house year old new good man day"
).split()

TEXT = (
    "the jury said the city election was good . the capital of france is paris . "
    "he said the county court had made a report about the tax money . "
    "she was in the house by the river for a long time . "
    "they find the water very cold in the first year . "
) * 3


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<bos>", "<eos>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS + ["."])))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    tok.save_pretrained(path)
    return tok


def build_hf_model(path: Path, arch: str, n_layers: int = 3, random_norms: bool = False) -> Path:
    """Save a random tiny GPT-2 or Llama in HF layout (config.json, safetensors, tokenizer); with
    `random_norms`, norm weights (and biases) that are not 1 (and 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed({"gpt2": 1, "llama": 2}[arch])
    tok = build_tokenizer(path)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_ctx=64, n_embd=32, n_layer=n_layers, n_head=4,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default weights so layers do something visible
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
            elif random_norms and "norm" in name or random_norms and ".ln_" in name:
                p.copy_(torch.rand(p.shape) + 0.5 if name.endswith("weight") else torch.randn(p.shape) * 0.2)
    model.save_pretrained(path)
    return path


def random_transcoders(model, d_sae: int = 40, seed: int = 0, layers=None, **kw):
    """A TranscoderSet of random ReLU transcoders reading ln2.hook_normalized, one per layer."""
    from circuit_catalog.ingest.transcoder import Transcoder, TranscoderConfig, TranscoderSet

    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    out = {}
    for layer in layers if layers is not None else range(model.cfg.n_layers):
        cfg = TranscoderConfig(layer=layer, d_in=d, d_sae=d_sae, d_out=d, hook_in=f"blocks.{layer}.ln2.hook_normalized",
                               hook_out=f"blocks.{layer}.hook_mlp_out", **kw)
        out[layer] = Transcoder(
            cfg,
            torch.randn(d, d_sae, generator=g) / d**0.5,
            torch.randn(d_sae, generator=g) * 0.1,
            torch.randn(d_sae, d, generator=g) / d**0.5,
            torch.randn(d, generator=g) * 0.1,
        )
    return TranscoderSet(out)


def random_clt(model, d_sae: int = 40, seed: int = 0):
    """A random cross-layer transcoder: `random_transcoders` plus decoder slices into every later layer."""
    tset = random_transcoders(model, d_sae=d_sae, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    n, d = model.cfg.n_layers, model.cfg.d_model
    for tc in tset:
        if tc.layer < n - 1:
            tc.W_dec_later = torch.randn(d_sae, n - 1 - tc.layer, d, generator=g) / d**0.5
            tc.check()
    return tset


def with_skip(tset, seed: int = 5):
    """Give every transcoder of `tset` a random skip path (x @ W_skip), in place."""
    g = torch.Generator().manual_seed(seed)
    for tc in tset:
        tc.W_skip = torch.randn(tc.cfg.d_in, tc.cfg.d_out, generator=g) * 0.05
    return tset


@pytest.fixture(scope="session")
def ct_python() -> Path:
    """circuit-tracer's own venv (bench/circuit_tracer/setup_venv.sh; scripts/test.sh builds it first): the
    comparisons with circuit-tracer fail, naming the reason, when it cannot be had."""
    import subprocess

    from circuit_catalog.ingest.models import cache_root

    venv = Path(os.environ.get("CIRCUIT_CATALOG_CT_VENV", cache_root() / "circuit-tracer-venv"))
    setup = Path(__file__).resolve().parent.parent / "bench" / "circuit_tracer" / "setup_venv.sh"
    done = subprocess.run(["bash", str(setup), str(venv)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"circuit-tracer could not be installed in its own venv ({reason})")
    return venv / "bin" / "python"


@pytest.fixture()
def saelens_dir(tmp_path, gpt2) -> Path:
    """Random transcoders for the tiny GPT-2, saved in SAELens layout (one folder per layer)."""
    from circuit_catalog.ingest.transcoder_formats import save_saelens

    d = tmp_path / "tc"
    for tc in random_transcoders(gpt2, d_sae=8):
        save_saelens(tc, d / f"layer_{tc.layer}")
    return d


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


# Where the device-parametrised tests run: the CPU always, CUDA where there is one; the CUDA case is always
# collected, so a run without it reports the skip and its reason.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(scope="session")
def model_on(gpt2_dir, llama_dir):
    """`model_on(arch, device="cpu", dtype="float32")`: the tiny "gpt2" or "llama" loaded there, once per combination
    (the session's `gpt2` and `llama` are the CPU float32 ones)."""
    from circuit_catalog.ingest.models import load_model

    dirs, loaded = {"gpt2": gpt2_dir, "llama": llama_dir}, {}

    def get(arch: str, device: str = "cpu", dtype: str = "float32"):
        if (arch, device, dtype) not in loaded:
            loaded[arch, device, dtype] = load_model(str(dirs[arch]), device=device, dtype=dtype)
        return loaded[arch, device, dtype]

    return get


def arch_of(model) -> str:
    """"gpt2" or "llama": which tiny model this is (to load it again elsewhere with `model_on`)."""
    return {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}[model.cfg.original_architecture]


@pytest.fixture(scope="session")
def gpt2(model_on):
    return model_on("gpt2")


@pytest.fixture(scope="session")
def llama(model_on):
    return model_on("llama")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny(request, gpt2, llama):
    """Each tiny model in turn: LayerNorm + learned positions, and RMSNorm + rotary + GQA."""
    return {"gpt2": gpt2, "llama": llama}[request.param]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text("\n\n".join([TEXT] * 20))
    return p


STATS_TOKENS, STATS_CTX = 600, 16  # the statistics of `stats_catalog`: 38 contexts of 16 tokens


@pytest.fixture(scope="session")
def stats_catalog(tmp_path_factory, gpt2, text_file):
    """(catalog dir, transcoders): the tiny GPT-2 with random transcoders, ingested with activation statistics."""
    from circuit_catalog.ingest.job import build_manifest, run_ingest, run_stats
    from circuit_catalog.ingest.settings import IngestSettings

    root = tmp_path_factory.mktemp("stats-catalog")
    tset = random_transcoders(gpt2, d_sae=24, seed=11)
    run_ingest(gpt2, tset, root, build_manifest(gpt2, "tiny", tset, "mem", IngestSettings(top_k=3, token_top_k=3)), progress=False)
    assert run_stats(gpt2, tset, root, str(text_file), STATS_TOKENS, ctx_len=STATS_CTX, top_k=5, progress=False)
    return root, tset
