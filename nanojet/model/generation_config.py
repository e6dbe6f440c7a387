"""A model's generation_config.json: the sampling defaults it ships, and whether it asks for token healing.

As in transformers and vLLM, a model's temperature / top_p / top_k / max_new_tokens apply when the user sets
none of their own. `"do_sample": false` means greedy in transformers whatever the temperature says, so the
sampling fields are not taken then. `token_healing` follows transformers' GenerationConfig field of that name
(default false)."""
import json
from dataclasses import dataclass, field
from pathlib import Path

from nanojet.engine.sampling import SamplingParams

SAMPLING_FIELDS = ("temperature", "top_p", "top_k")


@dataclass
class GenerationDefaults:
    sampling: dict = field(default_factory=dict)  # SamplingParams fields the model sets, e.g. {"temperature": 0.6}
    token_healing: bool = False

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "GenerationDefaults":
        path = Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object; fix or remove it")
        sampling = {}
        if raw.get("do_sample") is not False:
            sampling = {name: raw[name] for name in SAMPLING_FIELDS if raw.get(name) is not None}
        if raw.get("max_new_tokens") is not None:
            sampling["max_new_tokens"] = raw["max_new_tokens"]
        try:
            SamplingParams(**sampling)
        except ValueError as error:
            raise ValueError(f"{path}: {error}; fix the file or remove the field") from None
        healing = raw.get("token_healing", False)
        if not isinstance(healing, bool):
            raise ValueError(f"{path}: token_healing must be true or false, got {healing!r}")
        return cls(sampling=sampling, token_healing=healing)
