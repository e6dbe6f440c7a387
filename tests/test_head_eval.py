"""head_eval.draft_fit: the teacher-forced per-depth fit equals what the inference path drafts, anchor by anchor."""
import torch
from conftest import draft_after, make_engine, random_head

from nanojet.engine.kv_cache import Sequence
from nanojet.engine.sampling import SamplingParams
from nanojet.model.config import ModelConfig
from nanojet.train.head_eval import draft_fit


def test_draft_fit_matches_the_inference_draft_at_every_anchor(hf_model_dir):
    directory, _ = hf_model_dir
    head = random_head(ModelConfig.from_dir(directory), seed=5, block_size=4)
    engine = make_engine(directory, page_size=4, head=head)
    prompt = [9, 4, 77, 120, 31]
    text = prompt + engine.generate(prompt, SamplingParams(max_new_tokens=10)).token_ids
    fit = draft_fit(engine.target, head, [text], [len(prompt)], anchors_per_forward=3)  # several forwards
    with torch.no_grad():
        target_logp = engine.target.logits(engine.target.forward_dense(torch.tensor([text]))[0][0]).log_softmax(-1)
    rows = {name: [] for name in ("top1", "best_path", "in_top4_path", "draft_logp", "target_logp", "kl")}
    for anchor in range(len(prompt), len(text) - head.config.block_size + 1):
        sequence = Sequence()
        engine.prefill(sequence, text[:anchor], extend_head=True)
        draft = draft_after(engine, sequence, text[anchor])  # [B-1, V]: depth j drafts position anchor + j
        engine.kv.free(sequence)
        teacher = target_logp[anchor:anchor + head.config.block_size - 1]
        chosen = teacher.argmax(-1)
        assert torch.equal(chosen, torch.tensor(text[anchor + 1:anchor + head.config.block_size]))  # greedy text
        top1 = (draft.argmax(-1) == chosen).float()
        rows["top1"].append(top1)
        rows["best_path"].append(top1.cumprod(0))
        rows["in_top4_path"].append((draft.topk(4, -1).indices == chosen[:, None]).any(-1).float().cumprod(0))
        rows["draft_logp"].append(draft.gather(-1, chosen[:, None])[:, 0])
        rows["target_logp"].append(teacher.gather(-1, chosen[:, None])[:, 0])
        rows["kl"].append((teacher.exp() * (teacher - draft)).sum(-1))
    assert fit["anchors"] == len(rows["top1"]) == 7
    for name, values in rows.items():
        torch.testing.assert_close(torch.tensor(fit[name]), torch.stack(values).mean(0), atol=2e-3, rtol=0)
