"""Generative export of causal LMs (key/value cache in and out), the Generator that runs it, and
``slimkit generate``."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import slimkit as sk
from slimkit.export import Generator
from slimkit.export.generative import _check, cache_layout
from slimkit.export.onnx import default_tolerance

pytest.importorskip("transformers")
from slimkit.zoo.archs import ARCHS  # noqa: E402

INT4 = [{"weights": {"bits": 4, "group_size": 32}}, {"activations": {"mode": "none"}}, {"embeddings": {"bits": 4}}]


def _greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", pytest.param("opt", marks=pytest.mark.slow),
                                  pytest.param("phi", marks=pytest.mark.slow),
                                  pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("gpt-neox", marks=pytest.mark.slow)])
def test_a_float_decoder_generates_in_onnx_runtime_what_it_generates_in_pytorch(arch, tmp_path):
    model, batch = ARCHS[arch].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = sk.export_onnx(model, tmp_path / "lm" / "model.onnx", batch, generative=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert r.parity.ok and r.tokens_file == r.tokens_torch and len(r.tokens_torch) == 8
    layers = model.config.num_hidden_layers
    assert r.inputs[:2] == ["input_ids", "attention_mask"] and r.inputs[-1] == f"past_key_values.{layers - 1}.value"
    assert r.outputs == ["logits", *[f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]]
    graph = onnx.load(r.path).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim] == \
        ["batch_size", r.layout.kv_heads, "past_sequence_length", r.layout.head_dim]
    config = json.loads((tmp_path / "lm" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == r.layout.kv_heads
    assert config["model"]["decoder"]["num_hidden_layers"] == layers
    # the Generator: greedy from the prompt equals PyTorch's generate, for a longer run too
    prompt = batch["input_ids"][:1]
    g = Generator(tmp_path / "lm")
    assert g.generate(prompt[0].tolist(), max_new_tokens=12).tokens == _greedy(model, prompt, 12)


def test_grouped_query_attention_cache_has_the_kv_heads():
    model, batch = ARCHS["llama-gqa"].build()
    layout = cache_layout(model, batch["input_ids"][:1])
    assert layout.kv_heads == model.config.num_key_value_heads < model.config.num_attention_heads
    assert layout.positions and layout.layers == model.config.num_hidden_layers


@pytest.mark.parametrize("passes", ["int8-dynamic", "int8-smoothquant", "int4", "int4-gptq", "int4-awq"])
def test_quantized_decoders_export_with_their_cache(passes, tmp_path):
    model, batch = ARCHS["llama-gqa"].build()
    spec = {"int4": INT4, "int4-gptq": [*INT4[:2], "gptq", INT4[2]], "int4-awq": [*INT4[:2], "awq", INT4[2]]}
    q = sk.quantize(model, spec.get(passes, passes), calib_data=[batch])
    r = sk.export_onnx(q, tmp_path / "q" / "model.onnx", batch, generative=True)
    assert r.parity.ok and r.parity.file_vs_float is not None  # judged against the float model's logits
    float_file = sk.export_onnx(model, tmp_path / "f" / "model.onnx", batch, generative=True)
    assert r.size_bytes < 0.8 * float_file.size_bytes
    nodes = onnx.load(r.path).graph.node
    assert ("MatMulNBits" if passes.startswith("int4") else "MatMulInteger") in {n.op_type for n in nodes}
    levels = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == ({4} if passes.startswith("int4") else set())  # int8 compute: decoding is memory-bound
    tokens = Generator(tmp_path / "q").generate(batch["input_ids"][0].tolist(), max_new_tokens=8).tokens
    assert tokens == r.tokens_file


def test_a_file_that_computes_something_else_fails_parity(tmp_path):
    model, batch = ARCHS["llama-gqa"].build()
    r = sk.export_onnx(model, tmp_path / "model.onnx", batch, generative=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # PyTorch now computes another function than the file
    prompt = batch["input_ids"][:1]
    parity, torch_tokens, file_tokens = _check(model, r.path, r.layout, prompt, False, None, default_tolerance)
    assert not parity.ok and torch_tokens != file_tokens


def _word_tokenizer(folder, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return fast


def _text_lm(vocab):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   eos_token_id=1, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_text_in_text_out_with_a_tokenizer_folder_and_the_cli(tmp_path):
    words = [f"w{i}" for i in range(40)]
    tok = _word_tokenizer(tmp_path / "tok", words)
    model = _text_lm(len(tok))
    ids = torch.tensor([tok("w1 w2 w3 w4")["input_ids"]])
    sk.export_onnx(model, tmp_path / "lm" / "model.onnx", ids, generative=True)
    g = Generator(tmp_path / "lm", tokenizer=tmp_path / "tok")
    streamed: list[str] = []
    out = g.generate("w1 w2 w3 w4", max_new_tokens=6, on_token=lambda t, s: streamed.append(s))
    expected = _greedy(model, ids, 6)
    if 1 in expected:  # the end-of-sequence token stops it
        expected = expected[:expected.index(1)]
    assert out.tokens == expected and out.text == tok.decode(expected) and "".join(streamed).replace(" ", "") == \
        out.text.replace(" ", "")
    assert out.seconds_to_first_token > 0 and out.prompt_tokens == 4
    first = tok.decode(out.tokens[:1])
    stopped = g.generate("w1 w2 w3 w4", max_new_tokens=6, stop=[first])
    assert stopped.stopped_by == "stop" and len(stopped.tokens) == 1
    sampled = [g.generate("w1 w2", max_new_tokens=6, do_sample=True, temperature=1.5, seed=s).tokens for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # a seed gives the same draw
    cli = subprocess.run([sys.executable, "-c", "from slimkit.cli import main; raise SystemExit(main())", "generate",
                          str(tmp_path / "lm"), "--tokenizer", str(tmp_path / "tok"), "--prompt", "w1 w2 w3 w4",
                          "--max-new-tokens", "6", "--no-stream"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == out.text.strip() and "tokens/s" in cli.stderr


def test_onnxruntime_genai_runs_the_folder(tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    model, batch = ARCHS["llama-gqa"].build()
    r = sk.export_onnx(model, tmp_path / "lm" / "model.onnx", batch, generative=True)
    prompt = batch["input_ids"][0].tolist()
    m = og.Model(str(tmp_path / "lm"))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == r.tokens_torch


def test_bad_input_is_named(tmp_path):
    bert, batch = ARCHS["bert"].build()
    with pytest.raises(ValueError, match="BertModel is not a Hugging Face causal language model"):
        sk.export_onnx(bert, tmp_path / "b.onnx", batch, generative=True)
    t5, batch = ARCHS["t5"].build()
    with pytest.raises(ValueError, match="encoder-decoder"):
        sk.export_onnx(t5, tmp_path / "t.onnx", batch, generative=True)
    model, batch = ARCHS["llama-gqa"].build()
    with pytest.raises(ValueError, match="takes token ids"):
        sk.export_onnx(model, tmp_path / "x.onnx", torch.randn(1, 4), generative=True)
    sk.export_onnx(model, tmp_path / "lm" / "model.onnx", batch, generative=True)
    g = Generator(tmp_path / "lm")
    with pytest.raises(ValueError, match="exceed the model's context of 64 tokens"):
        g.generate(list(range(1, 60)), max_new_tokens=10)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        g.generate("some text")
    past = g.empty_past(1)
    past = {k: np.zeros((1, g.kv_heads, 3, g.head_dim), np.float32) for k in past}
    with pytest.raises(ValueError, match="the attention mask covers 2 tokens, but the past holds 3"):
        g.step(np.array([[5]]), np.ones((1, 2), np.int64), past)
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*missing does not exist"):
        Generator(tmp_path / "lm", tokenizer=tmp_path / "missing")
    with pytest.raises(ValueError, match="at least one prompt"):
        g.generate_batch([])
    with pytest.raises(ValueError, match="the prompt holds no token"):
        g.generate([])
    with pytest.raises(ValueError, match="sampling needs temperature > 0"):
        g.generate([5, 6], do_sample=True, temperature=0.0)
    nan = Generator(tmp_path / "lm")
    nan.step = lambda ids, mask, past: (np.full((ids.shape[0], ids.shape[1], 8), np.nan, np.float32), past)
    with pytest.raises(ValueError, match="non-finite logits for prompt 0 at new token 0"):
        nan.generate([5, 6])
    plain = sk.export_onnx(torch.nn.Linear(4, 2), tmp_path / "plain.onnx", torch.randn(1, 4))
    with pytest.raises(ValueError, match="not a generative export"):
        Generator(plain.path)


def test_float_compute_for_4_bit_layers_on_request(tmp_path):
    model, batch = ARCHS["llama-gqa"].build()
    q = sk.quantize(model, INT4)
    r = sk.export_onnx(q, tmp_path / "q" / "model.onnx", batch, generative=True, accuracy_level=None)
    nodes = [n for n in onnx.load(r.path).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and not any(a.name == "accuracy_level" for n in nodes for a in n.attribute)
    assert r.parity.ok and not any("export_accuracy_level" in vars(m) for m in q.modules())  # nothing left set
    with pytest.raises(ValueError, match="accuracy_level is MatMulNBits' 0-4"):
        sk.export_onnx(q, tmp_path / "x" / "model.onnx", batch, generative=True, accuracy_level=7)


def test_the_zoo_llama_generates_bytes_through_its_tokenizer(tmp_path):
    from slimkit.zoo.llama import ByteTokenizer, tiny_llama

    model = tiny_llama(num_hidden_layers=2)
    tok = ByteTokenizer()
    ids = torch.tensor([tok("def add(a, b):")["input_ids"]])
    r = sk.export_onnx(model, tmp_path / "lm" / "model.onnx", ids, generative=True)
    assert r.parity.ok and r.layout.kv_heads == 2 and r.layout.head_dim == 32
    assert json.loads((tmp_path / "lm" / "genai_config.json").read_text())["model"]["eos_token_id"] == 0
    out = Generator(tmp_path / "lm", tokenizer=tok).generate("def add(a, b):", max_new_tokens=6)
    expected = _greedy(model, ids, 6)
    if 0 in expected:
        expected = expected[:expected.index(0)]
    assert out.tokens == expected and out.text == tok.decode(expected)


@pytest.mark.slow
def test_the_trained_zoo_llama_writes_docstring_text_and_keeps_it_at_int4(tmp_path):
    from slimkit.zoo.gpt import lm_data, perplexity
    from slimkit.zoo.llama import ByteTokenizer, lm_logits, trained_llama

    model = trained_llama()
    train, test = lm_data(128)
    fp32 = perplexity(lm_logits(model), test[:64])
    assert fp32 < 4.0  # bytes: an untrained model is at 256
    q = sk.quantize(model, sk.quant.PRESETS["int4-gptq"].with_pass(sk.quant.Embeddings(bits=4)),
                    calib_data=[{"input_ids": train[i:i + 16, :-1]} for i in range(0, 64, 16)])
    assert perplexity(lm_logits(q), test[:64]) < 1.1 * fp32
    tok = ByteTokenizer()
    ids = torch.tensor([tok("Return the ")["input_ids"]])
    sk.export_onnx(q, tmp_path / "q" / "model.onnx", ids, generative=True)
    text = Generator(tmp_path / "q", tokenizer=tok).generate("Return the ", max_new_tokens=24).text
    assert sum(c.isalpha() or c == " " for c in text) >= 0.8 * len(text)  # words, not noise


def test_a_model_over_the_protobuf_limit_keeps_its_tensors_beside_the_file(tmp_path, monkeypatch):
    """Above 2 GiB of tensors (here: the limit lowered to 4 kB) a model is traced to disk and written
    as ``model.onnx`` with ``model.onnx.data`` beside it; ONNX Runtime, the Generator and
    onnxruntime-genai read the folder; a refused file leaves nothing behind."""
    from slimkit.export import writing

    monkeypatch.setattr(writing, "LARGE", 4096)
    model, batch = ARCHS["llama-gqa"].build()
    r = sk.export_onnx(model, tmp_path / "lm" / "model.onnx", batch, generative=True)
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data"]
    assert r.parity.ok and r.tokens_file == r.tokens_torch
    weights = onnx.load(r.path, load_external_data=False).graph.initializer
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert r.size_bytes == sum(p.stat().st_size for p in (tmp_path / "lm").glob("model.onnx*"))
    assert all(t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) <= 1024 for t in weights)
    prompt = batch["input_ids"][:1]
    assert Generator(tmp_path / "lm").generate(prompt[0].tolist(), max_new_tokens=12).tokens == _greedy(model, prompt, 12)
    og = pytest.importorskip("onnxruntime_genai")
    m = og.Model(str(tmp_path / "lm"))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=prompt.shape[1] + 4, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(prompt.numpy().astype(np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == _greedy(model, prompt, 4)
    # the plain export too, and a file its check refuses is not left behind (nor its tensors)
    plain = sk.export_onnx(model, tmp_path / "plain" / "model.onnx", batch)
    assert plain.parity.ok and (tmp_path / "plain" / "model.onnx.data").exists()
    proto = onnx.load(plain.path)

    def refuse(tmp):
        raise sk.export.ParityError("refused")

    (tmp_path / "refused").mkdir()
    with pytest.raises(sk.export.ParityError):
        writing.write_checked(proto, tmp_path / "refused" / "model.onnx", refuse)
    assert list((tmp_path / "refused").iterdir()) == []
