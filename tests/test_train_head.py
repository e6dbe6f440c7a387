"""train_head.py: the training mask matches inference, the loss falls, checkpoints resume exactly, and the
trained head decodes losslessly."""
import json
import random

import torch

from conftest import make_engine, random_head
from nanojet.config import ModelConfig
from nanojet.engine import SpeculativeParams
from nanojet.head import load_head
from nanojet.kv_cache import Sequence
from nanojet.sampling import SamplingParams
import train_head


def test_training_forward_equals_inference_draft(hf_model_dir):
    """Same context and block -> same logits through the block-sparse training mask and the paged engine."""
    directory, _ = hf_model_dir
    for causal in (True, False):
        head = random_head(ModelConfig.from_dir(directory), causal=causal, seed=3)
        engine = make_engine(directory, page_size=4, head=head)
        text = [9, 4, 77, 120, 31, 8, 8, 200, 14, 51, 2, 90, 13, 17, 60, 5, 3, 44, 6, 1]
        anchors = [[6, 11], [3, 9]]  # two sequences (text and its reverse), two anchors each
        sequences = [text, text[::-1]]
        with torch.no_grad():
            _, taps = engine.target.forward_dense(torch.tensor(sequences), tap_layers=(0, 1))
            context = head.project_context(taps.flatten(0, 1))
            block = torch.full((4, 8), head.config.mask_token_id)
            positions = []
            for i, (s, a) in enumerate((s, a) for s in range(2) for a in anchors[s]):
                block[i, 0] = sequences[s][a]
                positions.append(a + torch.arange(8))
            mask = train_head.training_mask(torch.tensor(anchors), 20, 8, causal)
            hidden = head.forward_dense(context, torch.arange(20).repeat(2), engine.target.embed_tokens(block.flatten()),
                                        torch.cat(positions), mask)
            training = torch.log_softmax(engine.target.logits(hidden.view(4, 8, -1)[:, 1:]), -1)
            for i, (s, a) in enumerate((s, a) for s in range(2) for a in anchors[s]):
                sequence = Sequence()
                engine._prefill(sequence, sequences[s][:a], SamplingParams(), (0, 1))
                inference = engine._draft(sequence, torch.tensor(sequences[s][a]))
                engine.kv.free(sequence)
                torch.testing.assert_close(training[i], inference, atol=1e-4, rtol=1e-4)


def test_a_few_steps_lower_the_loss(hf_model_dir):
    directory, _ = hf_model_dir
    engine = make_engine(directory)
    head = random_head(ModelConfig.from_dir(directory), seed=4)
    head.train()
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        loss, _ = train_head.head_loss(engine.target, head, tokens, 8, "kl", 1.0, 4.0, random.Random(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_default_layer_ids_never_tap_the_last_layer():
    for layers in (3, 6, 28, 36):
        ids = train_head.default_layer_ids(layers)
        assert ids and max(ids) <= layers - 2 and ids == sorted(set(ids))


def write_data(path):
    rng = random.Random(0)
    rows = [{"text": "".join(rng.choice("abcdef (){}:\n") for _ in range(300))} for _ in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def train_args(directory, out, data, **extra):
    args = ["--model", str(directory), "--out", str(out), "--data", str(data), "--mask-token", "<|im_end|>",
            "--target-layer-ids", "0,1", "--steps", "4", "--batch", "2", "--seq", "64", "--anchors", "4",
            "--checkpoint-every", "2", "--eval-prompts", "0", "--device", "cpu"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return train_head.parse_args(args)


def test_resume_continues_from_the_same_state(tmp_path, hf_model_dir):
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    straight = train_head.train(train_args(directory, tmp_path / "straight", data))
    train_head.train(train_args(directory, tmp_path / "sliced", data, stop_at=2))
    assert torch.load(tmp_path / "sliced" / "train_state.pt", weights_only=False)["step"] == 2
    sliced = train_head.train(train_args(directory, tmp_path / "sliced", data, resume=True))
    target = ModelConfig.from_dir(directory)
    a = load_head(straight, target, torch.float32, torch.device("cpu")).state_dict()
    b = load_head(sliced, target, torch.float32, torch.device("cpu")).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_trained_head_decodes_losslessly(tmp_path, hf_model_dir):
    directory, _ = hf_model_dir
    out = train_head.train(train_args(directory, tmp_path / "head", write_data(tmp_path / "d.jsonl")))
    head = load_head(out, ModelConfig.from_dir(directory), torch.float32, torch.device("cpu"))
    engine = make_engine(directory, head=head)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=30, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9]
    assert engine.generate(prompt, params, SpeculativeParams(16, 2)).token_ids == engine.generate(prompt, params).token_ids


def test_cli_bad_input_exits_2(tmp_path, hf_model_dir, capsys):
    assert train_head.main(["--model", str(tmp_path / "missing"), "--eval-prompts", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_data_formats_and_regen(tmp_path, hf_model_dir):
    """text, messages and prompt rows load; with --regen the target's own greedy continuation follows a prompt."""
    from nanojet.tokenizer import Tokenizer
    directory, _ = hf_model_dir
    tokenizer = Tokenizer.from_dir(directory)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"text": "abc"}, {"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "xyz"}]))
    plain = train_head.load_corpus(str(data), tokenizer, directory, regen=False, device="cpu")
    eos = tokenizer.eos_token_ids[0]
    chat = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                          add_generation_prompt=False))
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "xyz"}],
                                                            enable_thinking=False))
    assert plain == tokenizer.encode("abc") + [eos] + chat + [eos] + prompt + [eos]
    regen = train_head.load_corpus(str(data), tokenizer, directory, regen=True, device="cpu")
    continuation = regen[len(plain) - 1:-1]
    engine = make_engine(directory, max_model_len=512)  # the checkpoint's context, as LLM uses
    engine.eos_token_ids = set(tokenizer.eos_token_ids)
    assert continuation == engine.generate(prompt, SamplingParams(max_new_tokens=256)).token_ids
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}))
    try:
        train_head.load_corpus(str(bad), tokenizer, directory, regen=False, device="cpu")
    except ValueError as error:
        assert "'text', 'messages' or 'prompt'" in str(error)
    else:
        raise AssertionError("a row without text/messages/prompt was accepted")
