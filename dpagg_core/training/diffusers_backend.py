"""``TIBackend`` over diffusers/transformers models: SD1.x/SD2.x (one CLIP text encoder) and SDXL
(CLIP-L + OpenCLIP-G, pooled embeddings and size/crop time ids).

Placeholders are substituted in the *output* of the token-embedding layer by a forward hook, so
the embedding matrix itself is never written: every non-placeholder row stays bit-identical and
no tokens are added to the tokenizer. Each prompt is tokenised to a fixed length (77) with its
own placeholder positions, and the frozen models (eval mode, no dropout, LayerNorm/GroupNorm per
sample) process each batch element independently, as ``dpagg_core.training.ti`` requires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpagg_core.errors import DpaggError
from dpagg_core.training.ti import PLACEHOLDER, LatentDist

SDXL_KEYS = ("clip_l", "clip_g")
SD_KEY = "emb_params"


@dataclass
class DiffusersCond:
    """Conditioning for ``UNet2DConditionModel``: cross-attention states and, for SDXL, the
    ``added_cond_kwargs`` (``text_embeds`` pooled, ``time_ids``)."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None


class DiffusersBackend:
    """Frozen diffusers models behind the ``dpagg_core.training.ti.TIBackend`` protocol.

    Build it with ``from_pipeline(pipe)`` for a ``StableDiffusionPipeline`` or
    ``StableDiffusionXLPipeline`` (e.g. from ``dpagg_core.training.models``). Training uses a
    ``DDPMScheduler`` built from the pipeline scheduler's config (same betas and prediction
    type), as diffusers' own textual-inversion example does.
    """

    def __init__(
        self,
        *,
        unet: Any,
        vae: Any,
        text_encoders: Sequence[Any],
        tokenizers: Sequence[Any],
        scheduler_config: Any,
        model_family: str,
        base_model_id: str = "",
        device: torch.device | str | None = None,
        prediction_type: str | None = None,
    ) -> None:
        from diffusers import DDPMScheduler

        if model_family not in ("sd1", "sd2", "sdxl"):
            raise DpaggError(f"model_family={model_family!r}: use 'sd1', 'sd2' or 'sdxl'")
        n_enc = 2 if model_family == "sdxl" else 1
        if len(text_encoders) != n_enc or len(tokenizers) != n_enc:
            raise DpaggError(
                f"model_family={model_family!r} needs {n_enc} text encoder(s) and tokenizer(s), "
                f"got {len(text_encoders)} and {len(tokenizers)}"
            )
        self.unet = unet
        self.vae = vae
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.model_family = model_family
        self.base_model_id = base_model_id
        self.encoder_keys: tuple[str, ...] = SDXL_KEYS if model_family == "sdxl" else (SD_KEY,)
        self.embedding_dims = {
            k: int(te.get_input_embeddings().embedding_dim)
            for k, te in zip(self.encoder_keys, self.text_encoders, strict=True)
        }
        overrides = {} if prediction_type is None else {"prediction_type": prediction_type}
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config, **overrides)
        self.prediction_type: str = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DpaggError(
                f"scheduler prediction_type={self.prediction_type!r} is not supported for "
                "textual inversion: 'epsilon' or 'v_prediction' only"
            )
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.device = torch.device(device) if device is not None else torch.device(unet.device)
        self.dtype: torch.dtype = unet.dtype
        self._token_cache: dict[tuple[int, str, int], tuple[list[int], list[int]]] = {}

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        *,
        base_model_id: str = "",
        model_family: str | None = None,
        device: torch.device | str | None = None,
        prediction_type: str | None = None,
    ) -> DiffusersBackend:
        """Wrap a diffusers SD1/SD2/SDXL pipeline. ``model_family`` defaults to 'sdxl' when the
        pipeline has ``text_encoder_2``, else 'sd2' for 1024-wide text encoders, else 'sd1'.
        ``prediction_type`` overrides the scheduler config's."""
        te2 = getattr(pipe, "text_encoder_2", None)
        if te2 is not None:
            family = model_family or "sdxl"
            encoders, tokenizers = [pipe.text_encoder, te2], [pipe.tokenizer, pipe.tokenizer_2]
        else:
            width = pipe.text_encoder.get_input_embeddings().embedding_dim
            family = model_family or ("sd2" if width == 1024 else "sd1")
            encoders, tokenizers = [pipe.text_encoder], [pipe.tokenizer]
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            scheduler_config=pipe.scheduler.config,
            model_family=family,
            base_model_id=base_model_id,
            device=device,
            prediction_type=prediction_type,
        )

    @classmethod
    def from_loaded(
        cls, model: Any, *, device: torch.device | str | None = None
    ) -> DiffusersBackend:
        """Wrap a ``dpagg_core.training.models.LoadedModel`` (its family, prediction type and public
        ``base_model_id``)."""
        return cls.from_pipeline(
            model.pipe,
            base_model_id=model.base_model_id,
            model_family=model.family,
            prediction_type=model.prediction_type,
            device=device,
        )

    @property
    def default_resolution(self) -> int:
        """The model's native training resolution in pixels (UNet sample size x VAE factor):
        512 for SD1.x / SD2-base, 768 for SD2 768-v, 1024 for SDXL."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * factor

    # -- protocol -------------------------------------------------------------------------------

    def _modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

    def prepare(self, *, gradient_checkpointing: bool) -> None:
        for m in self._modules():
            m.requires_grad_(False)
            m.eval()
            m.to(self.device)
            for sub in m.modules():
                if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                    raise DpaggError(
                        f"{type(m).__name__} contains BatchNorm, which mixes images in a batch; "
                        "per-image textual inversion cannot use this model"
                    )
        # diffusers checkpoints whenever grad is enabled (eval mode is fine); transformers only
        # checkpoints in train mode, so the (small) text encoders are not checkpointed.
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def initializer_embedding(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        counts = set()
        for key, tok, te in zip(
            self.encoder_keys, self.tokenizers, self.text_encoders, strict=True
        ):
            ids = tok(text, add_special_tokens=False).input_ids
            counts.add(len(ids))
            out[key] = te.get_input_embeddings().weight.detach()[ids].to("cpu").clone()
        if len(counts) != 1:
            raise DpaggError(
                f"initializer={text!r} tokenizes differently in the two text encoders: "
                "choose a plain single word such as 'painting'"
            )
        return out

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> LatentDist:
        vae = self.vae
        dist = vae.encode(images.to(self.device, vae.dtype)).latent_dist
        sf = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return LatentDist(mean=(dist.mean - shift) * sf, std=dist.std * sf)

    def _tokenize(self, enc: int, template: str, v: int) -> tuple[list[int], list[int]]:
        """Token ids (padded to the tokenizer's max length) and the v placeholder positions."""
        cache_key = (enc, template, v)
        if cache_key in self._token_cache:
            return self._token_cache[cache_key]
        tok = self.tokenizers[enc]
        prefix, suffix = template.split(PLACEHOLDER)
        pre = tok(prefix.strip(), add_special_tokens=False).input_ids if prefix.strip() else []
        suf = tok(suffix.strip(), add_special_tokens=False).input_ids if suffix.strip() else []
        slot = 0  # any ordinary token (never EOS, which marks the pooled position); replaced
        ids = [tok.bos_token_id, *pre, *([slot] * v), *suf, tok.eos_token_id]
        max_len = int(tok.model_max_length)
        if len(ids) > max_len:
            raise DpaggError(
                f"template {template!r} with {v} vectors is {len(ids)} tokens, over the text "
                f"encoder's {max_len}: shorten the template or use fewer vectors"
            )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids += [pad] * (max_len - len(ids))
        positions = list(range(1 + len(pre), 1 + len(pre) + v))
        self._token_cache[cache_key] = (ids, positions)
        return ids, positions

    @contextlib.contextmanager
    def _substitute(
        self, enc: int, positions: torch.Tensor, vectors: torch.Tensor
    ) -> Iterator[None]:
        """Replace the token-embedding *outputs* at ``positions`` [B, v] by ``vectors`` [B, v, d].
        The embedding weight is untouched (read only), so gradients reach only ``vectors``."""
        layer = self.text_encoders[enc].get_input_embeddings()
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]

        def hook(_module, _inputs, output):
            output = output.clone()
            output[rows, positions] = vectors.to(output.dtype)
            return output

        handle = layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def encode_prompts(
        self, templates: Sequence[str], vectors: dict[str, torch.Tensor], *, image_size: int
    ) -> DiffusersCond:
        hidden_list = []
        pooled = None
        for enc, key in enumerate(self.encoder_keys):
            vec = vectors[key].to(self.device)
            v = vec.shape[1]
            toks = [self._tokenize(enc, t, v) for t in templates]
            ids = torch.tensor([t[0] for t in toks], device=self.device)
            pos = torch.tensor([t[1] for t in toks], device=self.device)
            te = self.text_encoders[enc]
            with self._substitute(enc, pos, vec):
                out = te(ids, output_hidden_states=self.model_family == "sdxl")
            if self.model_family == "sdxl":
                hidden_list.append(out.hidden_states[-2])
                if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (pooled)
                    pooled = out[0]
            else:
                hidden_list.append(out.last_hidden_state)
        if self.model_family != "sdxl":
            return DiffusersCond(hidden=hidden_list[0])
        if pooled is None:
            raise DpaggError("SDXL text_encoder_2 must be a CLIPTextModelWithProjection")
        hidden = torch.cat(hidden_list, dim=-1)
        b = hidden.shape[0]
        # original size, crop top-left, target size: the whole image at the training resolution.
        time_ids = torch.tensor(
            [[image_size, image_size, 0, 0, image_size, image_size]],
            device=self.device,
            dtype=hidden.dtype,
        ).expand(b, -1)
        return DiffusersCond(hidden=hidden, added={"text_embeds": pooled, "time_ids": time_ids})

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: DiffusersCond
    ) -> torch.Tensor:
        dtype = self.unet.dtype
        kwargs = {}
        if cond.added is not None:
            kwargs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in cond.added.items()}
        return self.unet(
            noisy.to(dtype), timesteps, encoder_hidden_states=cond.hidden.to(dtype), **kwargs
        ).sample
