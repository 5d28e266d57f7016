"""The registered MLflow model: GPT-2 weights (safetensors) + params.yaml behind MLflow's pyfunc
interface, so `mlflow models serve` / `mlflow.pyfunc.load_model` turn prompts into text.

Logged as a "model from code": MLflow stores this file and runs it at load time (no pickle)."""

from __future__ import annotations

from pathlib import Path

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class GPT2PyFunc(PythonModel):
    """The served model: a list of text prompts in, sampled
    continuations out, as the evaluate stage samples them (params.yaml's runconfig.sample_*)."""

    def load_context(self, context) -> None:
        from gpt2core.config import load_params
        from gpt2core.hf_checkpoint import PARAMS_FILE, load_pretrained
        from gpt2core.tokenizer import get_tokenizer

        folder = Path(context.artifacts["model"])
        self.model = load_pretrained(folder).eval()
        self.run = load_params(folder / PARAMS_FILE).runconfig
        self.tokenizer = get_tokenizer()

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from gpt2core.evaluation import sample
        from gpt2core.tokenizer import EOS_ID

        prompts = list(model_input)
        max_new = int((params or {}).get("max_new_tokens", self.run.sample_max_new_tokens))
        return [self.tokenizer.decode(sample(self.model, self.tokenizer.encode(p), max_new_tokens=max_new,
                                             temperature=self.run.sample_temperature,
                                             top_k=self.run.sample_top_k, eos_id=EOS_ID))
                for p in prompts]


set_model(GPT2PyFunc())
