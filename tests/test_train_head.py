"""train_head.py: the training mask matches inference, the loss falls, checkpoints resume exactly, and the
trained head decodes losslessly."""
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import draft_after, make_engine, random_head
from train_helpers import base_argv, run_main, train_args, write_data

from nanojet.engine.kv_cache import Sequence
from nanojet.engine.request import SpeculativeParams
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig
from nanojet.model.head import load_head
from nanojet.tools import train_head


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
                engine.prefill(sequence, sequences[s][:a], extend_head=True)
                inference = draft_after(engine, sequence, sequences[s][a])
                engine.kv.free(sequence)
                torch.testing.assert_close(training[i], inference, atol=1e-4, rtol=1e-4)


def losses_of_a_few_steps(directory, steps: int) -> list[float]:
    """A random head trained for `steps` AdamW steps on one fixed batch of the target in `directory`."""
    engine = make_engine(directory)
    head = random_head(ModelConfig.from_dir(directory), seed=4)
    head.train()
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        loss, _ = train_head.head_loss(engine.target, head, tokens, 8, "kl", 1.0, 4.0, random.Random(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_few_steps_lower_the_loss(hf_model_dir):
    losses = losses_of_a_few_steps(hf_model_dir[0], 15)
    assert losses[-1] < 0.7 * losses[0]


def test_default_layer_ids_never_tap_the_last_layer():
    for layers in (3, 6, 28, 36):
        ids = train_head.default_layer_ids(layers)
        assert ids and max(ids) <= layers - 2 and ids == sorted(set(ids))


def test_resume_continues_from_the_same_state(tmp_path, hf_model_dir):
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    straight = train_head.train(train_args(directory, tmp_path / "straight", data))
    train_head.train(train_args(directory, tmp_path / "sliced", data, stop_at=2))
    assert json.loads((tmp_path / "sliced" / "train_state" / "state.json").read_text())["step"] == 2
    sliced = train_head.train(train_args(directory, tmp_path / "sliced", data, resume=True))
    target = ModelConfig.from_dir(directory)
    a = load_head(straight, target, torch.float32, torch.device("cpu")).state_dict()
    b = load_head(sliced, target, torch.float32, torch.device("cpu")).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_cli_trained_head_is_lossless(directory, tmp_path, max_new_tokens: int) -> None:
    """train_head.train (the CLI path) writes a head that loads and decodes exactly as plain decoding (top-p)."""
    out = train_head.train(train_args(directory, tmp_path / "head", write_data(tmp_path / "d.jsonl")))
    head = load_head(out, ModelConfig.from_dir(directory), torch.float32, torch.device("cpu"))
    engine = make_engine(directory, head=head)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=max_new_tokens, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9]
    assert engine.generate(prompt, params, SpeculativeParams(16, 2)).token_ids == engine.generate(prompt, params).token_ids


def test_trained_head_decodes_losslessly(tmp_path, hf_model_dir):
    assert_cli_trained_head_is_lossless(hf_model_dir[0], tmp_path, 30)


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


def test_block_row_j_is_taught_the_target_distribution_at_anchor_plus_j(hf_model_dir):
    """Label alignment, against a naive loss computed one anchor at a time: row j of the block anchored at a
    (input `[x_a, MASK ...]` at positions a, a+1, ..) drafts the token at position a+j, so its teacher is the
    target's distribution after position a+j-1. With every possible anchor drawn, the set of anchors does not
    depend on the sampler, so the two losses must agree. A label index off by one still lowers the loss, but
    not this one."""
    directory, _ = hf_model_dir
    engine = make_engine(directory)
    target = engine.target
    head = random_head(ModelConfig.from_dir(directory), seed=6)
    block, seq = head.config.block_size, 20
    tokens = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(3))
    anchors = range(1, seq - block + 1)  # every anchor with context before it and a full block of labels
    gamma = 4.0
    with torch.no_grad():
        loss, _ = train_head.head_loss(target, head, tokens, len(anchors), "kl", 1.0, gamma, random.Random(0))
        hidden, taps = target.forward_dense(tokens, tap_layers=tuple(head.config.target_layer_ids))
        teacher = torch.log_softmax(target.logits(hidden), -1)  # [2, seq, V]: row p is the token at p + 1
        weights = torch.exp(-torch.arange(block - 1) / gamma)
        per_anchor = []
        for b in range(2):
            for a in anchors:
                context = head.project_context(taps[b, :a])  # positions < a
                embeds = target.embed_tokens(torch.tensor([tokens[b, a].item()] + [head.config.mask_token_id] * (block - 1)))
                mask = torch.ones(block, a + block, dtype=torch.bool)
                mask[:, a:] = torch.ones(block, block, dtype=torch.bool).tril()
                out = head.forward_dense(context, torch.arange(a), embeds, a + torch.arange(block), mask)
                student = torch.log_softmax(target.logits(out[1:]), -1)  # row j-1 <-> depth j
                expected_teacher = teacher[b, a:a + block - 1]  # depth j: the distribution after position a+j-1
                kl = (expected_teacher.exp() * (expected_teacher - student)).sum(-1)
                per_anchor.append(kl)
        naive = (torch.stack(per_anchor).mean(0) * weights).sum() / weights.sum()
    torch.testing.assert_close(loss, naive, atol=1e-5, rtol=1e-5)


def test_train_head_on_a_moe_target(tmp_path):
    """train_head.py on a tiny random Qwen3-MoE target: the loss falls over a few steps, and the CLI writes a head
    that loads and decodes losslessly on that target."""
    from conftest import write_byte_tokenizer, write_hf_moe_model
    directory = tmp_path / "moe"
    write_hf_moe_model(directory, seed=6, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])
    write_byte_tokenizer(directory)
    losses = losses_of_a_few_steps(directory, 12)
    assert losses[-1] < 0.7 * losses[0]
    assert_cli_trained_head_is_lossless(directory, tmp_path, 24)


def test_default_output_is_a_new_folder_and_heads_are_not_overwritten(tmp_path, hf_model_dir, monkeypatch):
    directory, _ = hf_model_dir
    data = write_data(tmp_path / "data.jsonl")
    monkeypatch.chdir(tmp_path)
    args = train_args(directory, None, data, steps=1)
    args.out = None  # what `python train_head.py` without --out gives
    out = train_head.train(args)
    assert out.parent == Path("runs") and out.name.startswith("head-causal-") and (out / "config.json").is_file()
    assert not (directory / "head-causal").exists()  # nothing written beside the model
    with pytest.raises(ValueError, match="already holds a head; pass --overwrite"):
        train_head.train(train_args(directory, out, data, steps=1))
    before = (out / "model.safetensors").read_bytes()
    train_head.train(train_args(directory, out, data, steps=1, overwrite=True, seed=1))
    assert (out / "model.safetensors").read_bytes() != before


@pytest.mark.parametrize("rows, message", [
    (['{"text": "abc"}', '{"text": 123}'], "line 2: 'text' must be a string, got int 123"),
    (['"just a string"'], "line 1: a row must be a JSON object with 'text', 'messages' or 'prompt'; got a str"),
    (['{"text": "abc"}', '{"text": "abc"'], "line 2 is not valid JSON"),
    (['{"messages": "hi"}'], "line 1: 'messages' must be a list of"),
    (['{"prompt": ["a"]}'], "line 1: 'prompt' must be a string"),
    (['{"question": "?"}'], "line 1: a row needs 'text', 'messages' or 'prompt'"),
])
def test_bad_data_rows_are_one_line_naming_file_and_line(tmp_path, hf_model_dir, capsys, rows, message):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    code, err = run_main(capsys, base_argv(hf_model_dir[0], tmp_path / "out", data))
    assert code == 2 and err.count("\n") == 1 and f"{data} {message}" in err


@pytest.mark.parametrize("change, message", [
    ({"--batch": "0"}, "--batch must be >= 1, got 0"),
    ({"--steps": "0"}, "--steps must be >= 1, got 0"),
    ({"--target-layer-ids": "a,b"}, "--target-layer-ids takes comma-separated layer indices like 1,2,4; got 'a,b'"),
    ({"--anchors": "1000"}, "--anchors 1000 does not fit: a --seq 64 sequence has room for 56 anchors"),
    ({"--lr": "nan"}, "must be a finite number"),
    ({"--gamma": "0"}, "--gamma must be > 0"),
    ({"--seq": "100000", "--anchors": "2"}, "--seq 100000 exceeds the target's context (512 tokens"),
    ({"--data": "DIR"}, "is a directory; give a .jsonl file"),
    ({"--data": "MISSING"}, "does not exist; give a .jsonl file"),
    ({"--regen-prompts": "0"}, "--regen-prompts must be >= 1, got 0"),
    ({"--synthetic": "qwen3-0.6b", "--regen": None}, "--regen needs a real target to write responses"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, hf_model_dir, capsys, change, message):
    argv = base_argv(hf_model_dir[0], tmp_path / "out", write_data(tmp_path / "data.jsonl"))
    for flag, value in change.items():
        value = {"DIR": str(tmp_path), "MISSING": str(tmp_path / "none.jsonl")}.get(value, value)
        if value is None:  # a switch
            argv.append(flag)
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, err = run_main(capsys, argv)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_a_step_that_cannot_fit_in_memory_is_refused(hf_model_dir):
    args = train_head.parse_args(["--seq", "512", "--batch", "64"])
    target = ModelConfig.from_dir(hf_model_dir[0])
    needed = train_head.step_memory_bytes(args, target)
    assert needed > 64 * 512 * target.vocab_size * 4  # at least the teacher's logits
    train_head.check_step_fits(args, target, available=needed)
    with pytest.raises(ValueError, match="one step of --batch 64 --seq 512 --anchors 16 needs at least"):
        train_head.check_step_fits(args, target, available=needed - 1)


def test_every_flag_has_help():
    from nanojet.tools import run
    for parser in (train_head.build_parser(), run.build_parser()):
        assert [a.option_strings for a in parser._actions if not a.help] == []


def test_evaluation_reports_acceptance_by_depth(hf_model_dir):
    """tau and, per depth, the share of rounds that accepted that deep: consistent with each other."""
    directory, _ = hf_model_dir
    engine = make_engine(directory)
    head = random_head(ModelConfig.from_dir(directory), seed=1)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        head.save(folder)
        result = train_head.evaluate_tau(engine.target, folder, [[5, 6, 7, 8], [9, 10, 11]])
    for name in ("chain", "budget64"):
        by_depth = result[f"accept_by_depth_{name}"]
        assert len(by_depth) == head.config.block_size - 1
        assert all(a >= b for a, b in zip(by_depth, by_depth[1:]))  # a depth is accepted only after the ones above
        assert result[f"tau_{name}"] == pytest.approx(1 + sum(by_depth), abs=2e-3)  # tau = 1 + sum of depth rates
