"""Text guidance of CLIP-distilled STDC-Seg (Textual Guidance Module, Sec. 3.1.2, Eq. 1): the score
map ``S[b, k] = cos(F4[b, :, i, j], T_k)`` between every pixel of the last backbone stage and each
class's CLIP text embedding; plain cosine, no temperature (``docs/stdc_clip.md``, "Text guidance").

The embeddings T come from one of the paper's two stages (Sec. 3.2, §6 of the reference):

- ``prompt="fixed"`` (stage 1): the bare class names through CLIP once, kept as a frozen buffer.
  They are cached on disk keyed by the CLIP file's SHA-256 and the class names.
- ``prompt="learned"`` (stage 2): a :class:`PromptLearner` (class-specific context vectors,
  frozen CLIP text tower) recomputes them every forward.

Deployment (Sec. 3.3) keeps only the final embeddings: :meth:`TextGuidance.deploy` turns a learned
module into a fixed one and drops the text tower and the context vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segprompt.errors import SegpromptError, torch_load_reason
from segprompt.io import atomic_torch_save, sha256_file
from segprompt.models.text import DEFAULT_WEIGHTS

# clip_text and prompt_learner import open_clip (seconds): they are imported where a text
# guidance is built or loaded, so importing this module (the training loop does) stays cheap.

CLIP_ARCH = "RN50"  # the only CLIP whose text embedding (1024-d) has STDC's F4 width (docs/stdc_clip.md)
PROMPTS = ("fixed", "learned")


def _names_key(names: list[str]) -> str:
    blob = json.dumps({"arch": CLIP_ARCH, "class_names": names}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Float32 inside an autocast region; the ``meta`` device (parameter and FLOP counting) has
    no autocast to switch off."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class TextGuidance(nn.Module):
    """``forward(f4: [B, C, h, w]) -> S: [B, K, h, w]`` with C = 1024 (CLIP RN50's embedding width).

    Building it reads no weights or cache file (the builder makes models on the ``meta`` device; only
    the learned mode tokenises the names with open_clip's packaged vocabulary); the builder calls
    :meth:`load_pretrained` when weights are wanted. Until then the embeddings are random, like
    any other weight of a model built without pretrained files.
    """

    def __init__(self, class_names: Sequence[str], clip_weights: str = DEFAULT_WEIGHTS, prompt: str = "fixed",
                 n_ctx: int = 11, name_length: int = 5, embeddings_cache: str | None = None):
        super().__init__()
        names = list(class_names)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise SegpromptError(f"text guidance needs a non-empty list of class names, got {names!r}")
        if prompt not in PROMPTS:
            raise SegpromptError(f"prompt must be one of {list(PROMPTS)} ('fixed' = stage 1, 'learned' = "
                                 f"stage 2), got {prompt!r}")
        from segprompt.models.text.clip_text import CLIPTextEncoder, text_config
        from segprompt.models.text.prompt_learner import PromptLearner

        self.class_names = names
        self.num_classes = len(names)
        self.embed_dim = text_config(CLIP_ARCH)[0]
        self.clip_weights = str(clip_weights)
        self.embeddings_cache = embeddings_cache
        self.prompt = prompt
        self.deployed = False
        if prompt == "fixed":
            self.register_buffer("embeddings", torch.randn(self.num_classes, self.embed_dim))
        else:
            self.prompt_learner = PromptLearner(CLIPTextEncoder(CLIP_ARCH), names, n_ctx, name_length)

    # ---- embeddings -------------------------------------------------------------------------
    def text_embeddings(self) -> torch.Tensor:
        """``Tensor[K, 1024]``, un-normalised. The learned prompts run in float32 even under
        autocast (a few hundred tokens; keeps a deployed module equal to the learned one)."""
        if self.prompt == "fixed":
            return self.embeddings
        with _no_autocast(self.prompt_learner.ctx.device):
            return self.prompt_learner().float()

    def forward(self, f4: torch.Tensor) -> torch.Tensor:
        if f4.dim() != 4 or f4.shape[1] != self.embed_dim:
            raise ValueError(f"text guidance expects F4 of shape [B, {self.embed_dim}, h, w] (CLIP {CLIP_ARCH}'s "
                             f"embedding width), got {tuple(f4.shape)}")
        t = self.text_embeddings()
        with _no_autocast(f4.device):
            s = torch.einsum("bchw,kc->bkhw", F.normalize(f4.float(), dim=1), F.normalize(t.float(), dim=1))
        return s.to(f4.dtype)

    # ---- weights ----------------------------------------------------------------------------
    def cache_dir(self) -> Path:
        """Where stage-1 embeddings are cached: ``embeddings_cache``, or ``text_embeddings/`` beside
        the CLIP file (``pretrained/clip/text_embeddings/`` by default)."""
        if self.embeddings_cache is not None:
            return Path(self.embeddings_cache)
        return Path(self.clip_weights).parent / "text_embeddings"

    def load_pretrained(self) -> None:
        """Fixed: the cached embeddings of these class names for this CLIP file, else CLIP's
        ``encode_names`` (then cached atomically). A cache file is found by the CLIP file's hash, or,
        when the CLIP file is absent, by the class names alone if exactly one CLIP file was cached.
        Learned: the CLIP text tower's weights (the context vectors stay as initialised)."""
        if self.deployed:
            raise SegpromptError("this text guidance was deployed: its embeddings are the trained prompts' and "
                                 "would be replaced by CLIP's; load its checkpoint instead")
        if self.prompt == "learned":
            self.prompt_learner.encoder.load_pretrained(self.clip_weights)
            return
        emb = self._cached_embeddings()
        with torch.no_grad():
            self.embeddings.copy_(emb)

    def _cached_embeddings(self) -> torch.Tensor:
        from segprompt.models.text.clip_text import (
            CLIPTextEncoder,
            missing_weights_error,
        )

        clip = Path(self.clip_weights)
        key = _names_key(self.class_names)
        if clip.is_file():
            sha = sha256_file(clip)
            path = self.cache_dir() / f"{key}-{sha[:16]}.pt"
            if path.is_file():
                return self._read_cache(path, sha)
            encoder = CLIPTextEncoder(CLIP_ARCH)
            encoder.load_pretrained(clip)
            with torch.no_grad():
                emb = encoder.encode_names(self.class_names).float()
            atomic_torch_save({"embeddings": emb, "class_names": self.class_names, "arch": CLIP_ARCH,
                               "clip_file": str(clip), "clip_sha256": sha}, path)
            return emb
        found = sorted(self.cache_dir().glob(f"{key}-*.pt"))
        if len(found) == 1:
            return self._read_cache(found[0], None)
        if found:
            raise SegpromptError(f"CLIP weights '{clip}' (clip_weights) do not exist and {len(found)} cached text "
                                 f"embeddings of these classes from different CLIP files are in "
                                 f"'{self.cache_dir()}': {[p.name for p in found]}. Put the CLIP file back")
        raise missing_weights_error(clip, CLIP_ARCH)

    def _read_cache(self, path: Path, sha: str | None) -> torch.Tensor:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            emb = blob["embeddings"]
            ok = (blob["class_names"] == self.class_names and tuple(emb.shape) == (self.num_classes, self.embed_dim)
                  and (sha is None or blob["clip_sha256"] == sha))
        except Exception as e:
            raise SegpromptError(f"cached text embeddings '{path}' cannot be read ({torch_load_reason(e)}); "
                                 f"delete the file and it is recomputed from the CLIP weights") from None
        if not ok:
            raise SegpromptError(f"cached text embeddings '{path}' are for other class names or another CLIP "
                                 f"file; delete the file and it is recomputed from the CLIP weights")
        return emb

    # ---- deployment -------------------------------------------------------------------------
    @torch.no_grad()
    def deploy(self) -> bool:
        """Learned -> fixed: keep the current embeddings (computed once) as the ``embeddings`` buffer
        and drop the text tower and context vectors. Returns whether anything changed."""
        if self.prompt == "fixed":
            return False
        learner = self.prompt_learner
        was_training = learner.training
        learner.eval()
        emb = self.text_embeddings().detach().clone()
        learner.train(was_training)
        del self.prompt_learner
        self.register_buffer("embeddings", emb)
        self.prompt = "fixed"
        self.deployed = True
        return True


def load_text_pretrained(model: nn.Module) -> int:
    """Call :meth:`TextGuidance.load_pretrained` on every text guidance inside ``model`` (what the
    builder does when weights are wanted); returns how many there were."""
    found = [m for m in model.modules() if isinstance(m, TextGuidance)]
    for m in found:
        m.load_pretrained()
    return len(found)


def has_learned_text(model: nn.Module) -> bool:
    """Whether ``model`` holds a text-guidance module whose embeddings come from learned prompts."""
    return any(isinstance(m, TextGuidance) and m.prompt == "learned" and not m.deployed for m in model.modules())


def deploy_text(model: nn.Module) -> int:
    """Deploy every learned :class:`TextGuidance` inside ``model``; returns how many were deployed."""
    return sum(m.deploy() for m in list(model.modules()) if isinstance(m, TextGuidance))
