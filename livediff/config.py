"""Settings: one dataclass per area, validated on construction, passed down as a whole.

`EngineSettings` is fixed for the life of an engine (what gets compiled).
`StreamParams` belong to one stream (one session) and may change on any frame.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livediff.errors import ConfigError

BACKENDS = (
    "auto",
    "torch",
    "cuda-graph",
    "cuda-graph-compiled",
    "cuda-graph-fused-norm",
    "cuda-graph-compiled-fp8",
    "onnx",
    "openvino",
    "tensorrt",
)
DTYPES = ("auto", "float16", "bfloat16", "float32")
MAX_STEPS = 4
MAX_BANK_FRAMES = 4
"""Most earlier frames a stream's feature bank keeps (`StreamParams.temporal_bank`)."""
MAX_CONTROLNETS = 4
"""Most ControlNets one stream may apply at once (`StreamParams.controlnet`)."""
PREPROCESSORS = ("canny", "depth", "previous")
"""Control images: Canny edges of the frame, its depth map, or the stream's previous output frame."""
MAX_CONTROL_SCALE = 2.0
"""Largest ControlNet conditioning scale (diffusers' `controlnet_conditioning_scale`; 1 is as trained)."""
CONTROLNET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
MAX_LORAS = 4
"""Most LoRAs one stream may apply at once (`StreamParams.loras`)."""
MAX_LORA_SCALE = 2.0
"""LoRA scales lie in [-MAX_LORA_SCALE, MAX_LORA_SCALE] (1 is as trained; negative pushes away from it)."""
IMAGE_SOURCES = ("frame", "upload")
"""Where a stream's image prompt comes from: its own camera frame, captured once, or the image
uploaded for the session (`PUT /api/sessions/{id}/image-prompt`)."""
MAX_IMAGE_PROMPT_SCALE = 2.0
"""Image-prompt scales lie in [0, MAX_IMAGE_PROMPT_SCALE] (1 is as trained; 0 leaves the image out)."""
LIVE_SIZE = {"cuda": 512, "cpu": 256}
"""`--size auto` (the CLI's default): the frame side in pixels that each kind of device runs live
with its default model and backend. SD-Turbo's own size on CUDA; on a CPU, where the server runs
the model on one core, the built-in `tiny` model at 512x512 returns a few frames a second (about 9
of a 30 fps camera on a quiet 2-core Zen 4, with OpenVINO in bf16), which does not feel live, and a
256x256 frame costs 3.5-4 times less (the `bench --g2g` figures at both sizes in
docs/benchmarks.md#why---size-auto-is-256x256-on-a-cpu). The library's `EngineSettings` keeps 512x512."""


@dataclass(frozen=True)
class VideoSettings:
    """What fixes a video engine's caches and schedule (`EngineSettings.video`; `--video-sink`,
    `--video-window`, `--video-shift`)."""

    sink: int = 1
    """Latent frames kept for good at the start of each stream's cache (attention sinks)."""
    window: int = 4
    """Most recent latent frames kept after the sinks (the rolling window)."""
    position_limit: int = 1024
    """Frame positions stay below this: the window is refreshed before (Wan's rotary table length)."""
    shift: float = 5.0
    """Flow-matching timestep shift (Wan 2.1 text-to-video samples with 5; 1 leaves the schedule
    unwarped, as StreamDiffusionV2's and CausVid's samplers run it)."""
    stream_batch: bool = True
    """Stream Batch over the denoising steps (`livediff.engine.stream_batch`): one transformer call per
    step of the engine whatever the step counts; off, a chunk runs `steps` calls then a context pass."""

    def __post_init__(self) -> None:
        if not 0 <= self.sink <= 8:
            raise ConfigError(f"sink must be in 0..8 latent frames, got {self.sink}")
        if not 1 <= self.window <= 64:
            raise ConfigError(f"window must be in 1..64 latent frames, got {self.window}")
        if self.stream_batch and self.window < MAX_STEPS:
            raise ConfigError(f"window must be at least {MAX_STEPS} latent frames with stream_batch, got {self.window}")
        if not 0 < self.shift <= 20:
            raise ConfigError(f"shift must be in (0, 20], got {self.shift}")
        if self.position_limit < self.sink + self.window + 2:
            raise ConfigError(f"position_limit must exceed sink + window + 2, got {self.position_limit}")


@dataclass(frozen=True)
class EngineSettings:
    model: str = "auto"
    """`auto`, `tiny`, `sd-turbo-random`, a Hugging Face id or a local diffusers folder."""
    vae: str = "taesd"
    """`taesd` (AutoencoderTiny, fast), `full` (the model's own AutoencoderKL) or a VAE id/folder."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:N`."""
    dtype: str = "auto"
    """`auto`: float16 on CUDA; bfloat16 for `openvino` on a CPU with bf16 instructions; else float32."""
    height: int = 512
    """Frame height in pixels; a multiple of 8."""
    width: int = 512
    """Frame width in pixels; a multiple of 8."""
    backend: str = "torch"
    """Runs the networks: `torch`, `cuda-graph` (torch's networks, each step's stages replayed from
    CUDA graphs), `cuda-graph-compiled` (the same with inductor-compiled networks inside the graphs),
    `cuda-graph-fused-norm` (`cuda-graph` with GroupNorm+SiLU fused), `cuda-graph-compiled-fp8` (the
    compiled one with the UNet's large linear layers in float8), `onnx` (ONNX Runtime), `openvino`
    (CPU), `tensorrt` (CUDA), or `auto` (`openvino` on the CPU where installed, else `onnx`; on CUDA
    the fastest variant a measurement in `engines_dir` found matching, else `cuda-graph`). The CLI's default is `auto`;
    here it is `torch`, which compiles nothing and writes nothing to `engines_dir`."""
    compile: bool = False
    """torch backend only: wrap the UNet and VAE in `torch.compile`."""
    max_batch: int = 4
    """Most frames in one engine step (sessions batched together)."""
    stream_batch: bool = False
    """Run the denoising steps of consecutive frames as one UNet batch (output lags steps-1 frames)."""
    engines_dir: Path = Path("engines")
    """Where compiled artifacts (ONNX files, TensorRT engines) are cached."""
    cache_size: int = 64
    """Prompt embeddings kept in the conditioning cache (LRU)."""
    feature_bank: bool = False
    """Make the temporal feature bank available to streams (`StreamParams.temporal_bank`): on the
    compiled backends a second UNet graph with the bank's inputs is exported and loaded beside the
    plain one (steps where no stream uses a bank keep running the plain graph)."""
    controlnets: tuple[tuple[str, str], ...] = ()
    """ControlNets that streams may name (`StreamParams.controlnet`): (name, source) pairs, the source
    a hub id, a local folder or a built-in (`tiny`, `sd-turbo-random`). Each is loaded when a stream
    first names it, off the frame path. With any, the compiled backends also export a UNet that
    takes ControlNet residuals (the same graph as the feature bank's when both are on)."""
    loras: tuple[tuple[str, str], ...] = ()
    """LoRAs that streams may apply (`StreamParams.loras`): (name, source) pairs, the source a
    `.safetensors` file, a folder, a hub id or a built-in random one (`tiny`, `random:RANK`); all
    loaded at start into the UNet's LoRA slots (`livediff.backends.multi_lora`)."""
    model_config: str = ""
    """For a single-file `model` (a `.safetensors` checkpoint): the diffusers config that describes
    it, a folder or hub id (`livediff.models.single_file`); empty: its family's (SD 1.x or SD-Turbo)."""
    lcm_lora: str = ""
    """An LCM-LoRA fused into the UNet at load, with the LCM scheduler, so that an SD 1.5-family
    checkpoint runs in 1-4 steps (`livediff.models.lcm_lora`): a `.safetensors` file, a folder, a
    hub id (latent-consistency/lcm-lora-sdv1-5) or a built-in random one (`tiny`); empty: none."""
    ip_adapter: str = ""
    """The IP-Adapter streams' image prompts use (`StreamParams.image_prompt`): a `.safetensors`
    file with its `image_encoder` folder beside it, a hub id, or the built-in `tiny`; empty: none.
    Loaded at start (`livediff.models.ip_adapter`)."""
    depth_model: str = ""
    """The depth estimator of the `depth` control image: a transformers depth-estimation model (hub
    id, folder, or the built-in `tiny`); empty: no `depth` preprocessor. Loaded on first use."""
    video_autoencoder: str = "auto"
    """A video model's streaming autoencoder: `tae`, `wan-vae` (Wan 2.1's VAE) or `auto` (`wan-vae`
    for a checkpoint with a `vae/`, else `tae`); `livediff.models.video.load_video_model`."""
    video_weights: str = ""
    """Causal Wan transformer weights in Wan's original layout, as StreamDiffusionV2, CausVid and
    Self-Forcing publish them (`model.pt`): a local file or a hub file `owner/name:path/in/repo.pt`,
    loaded into a transformer of `model`'s configuration, `model` (a Wan 2.1 T2V folder or hub id)
    supplying the text encoder, tokenizer and VAE (`livediff.models.wan_weights`); empty: `model`'s own."""
    video_autoencoder_weights: str = "auto"
    """The `tae` autoencoder's weights: `auto` (TAEHV's trained Wan 2.1 file from the hub for a real
    checkpoint, random for a built-in), `random`, or a `.pth` / `.safetensors` file or hub file
    (`owner/name:FILE`) in TAEHV's layout; `livediff.models.taehv_weights`."""
    video: VideoSettings = dataclasses.field(default_factory=VideoSettings)
    """A video model's cache and schedule (`livediff.engine.video`); image models ignore it."""

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value % 8:
                raise ConfigError(f"{name} must be a multiple of 8 and at least 64, got {value!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.max_batch <= 64:
            raise ConfigError(f"max_batch must be between 1 and 64, got {self.max_batch}")
        if self.cache_size < 1:
            raise ConfigError(f"cache_size must be at least 1, got {self.cache_size}")
        if self.compile and self.backend != "torch":
            raise ConfigError("compile applies to the torch backend only")
        names = [name for name, _ in self.controlnets]
        for name, source in self.controlnets:
            if not isinstance(name, str) or not CONTROLNET_NAME.fullmatch(name):
                raise ConfigError(f"controlnets: {name!r} is not a name (letters, digits, . _ / -, up to 100)")
            if not source:
                raise ConfigError(f"controlnets: {name!r} has no source (a hub id, a folder or a built-in)")
            if names.count(name) > 1:
                raise ConfigError(f"controlnets: {name!r} is named twice")
        lora_names = [name for name, _ in self.loras]
        for name, source in self.loras:
            if not isinstance(name, str) or not CONTROLNET_NAME.fullmatch(name):
                raise ConfigError(f"loras: {name!r} is not a name (letters, digits, . _ / -, up to 100)")
            if not source:
                raise ConfigError(f"loras: {name!r} has no source (a .safetensors file, a folder, a hub id or tiny)")
            if lora_names.count(name) > 1:
                raise ConfigError(f"loras: {name!r} is named twice")

    def replace(self, **changes: Any) -> EngineSettings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ControlParams:
    """One ControlNet a stream applies: which, to what control image, how strongly, over which steps.

    Errors name the field (`scale must be ...`); the live-params parser adds its place (`controlnet[0].scale`).
    """

    name: str
    """One of the engine's ControlNets (`EngineSettings.controlnets`)."""
    preprocessor: str = "canny"
    """The control image, one of `PREPROCESSORS`: `canny` edges, `depth` (needs
    `EngineSettings.depth_model`), or the stream's `previous` output frame (TemporalNet-style)."""
    scale: float = 1.0
    """Conditioning scale, 0 to `MAX_CONTROL_SCALE`: the residuals are multiplied by it (0: no effect)."""
    start: float = 0.0
    """Fraction of the denoising steps after which the ControlNet starts (diffusers'
    `control_guidance_start`): step k of n runs it when start <= k/n and (k+1)/n <= end."""
    end: float = 1.0
    """Fraction of the denoising steps after which it stops (`control_guidance_end`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not CONTROLNET_NAME.fullmatch(self.name):
            raise ConfigError(f"name must be a ControlNet's name, got {self.name!r}")
        if self.preprocessor not in PREPROCESSORS:
            raise ConfigError(f"preprocessor must be one of {', '.join(PREPROCESSORS)}, got {self.preprocessor!r}")
        if not 0.0 <= self.scale <= MAX_CONTROL_SCALE:
            raise ConfigError(f"scale must be in [0, {MAX_CONTROL_SCALE:g}], got {self.scale}")
        if not 0.0 <= self.start < 1.0:
            raise ConfigError(f"start must be in [0, 1), got {self.start}")
        if not self.start < self.end <= 1.0:
            raise ConfigError(f"end must be in (start, 1], got {self.end} with start {self.start}")

    def active(self, step: int, steps: int) -> bool:
        """Whether the ControlNet runs at denoising step `step` (0-based) of `steps`, as diffusers decides it."""
        return self.start <= step / steps and (step + 1) / steps <= self.end


@dataclass(frozen=True)
class LoRAParams:
    """One LoRA a stream applies, and how strongly. Errors name the field (`scale must be ...`);
    the live-params parser adds its place (`loras[1].scale`)."""

    name: str
    """One of the engine's LoRAs (`EngineSettings.loras`)."""
    scale: float = 1.0
    """Multiplies the LoRA's update, in [-`MAX_LORA_SCALE`, `MAX_LORA_SCALE`]; 0 leaves it out."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not CONTROLNET_NAME.fullmatch(self.name):
            raise ConfigError(f"name must be a LoRA's name, got {self.name!r}")
        if not -MAX_LORA_SCALE <= self.scale <= MAX_LORA_SCALE:
            raise ConfigError(f"scale must be in [{-MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], got {self.scale}")


@dataclass(frozen=True)
class ImagePromptParams:
    """A stream's image prompt (IP-Adapter): which image, how strongly. Errors name the field
    (`image_prompt.scale must be ...`)."""

    image: str = "frame"
    """One of `IMAGE_SOURCES`: `frame` (the stream's camera frame, captured once) or `upload`."""
    scale: float = 1.0
    """How strongly the image steers the picture, in [0, `MAX_IMAGE_PROMPT_SCALE`]; a change applies
    from the next frame with no new encoding."""
    version: int = 0
    """Counts the requests for an image: the engine takes the image again (captures a new frame,
    reads the latest upload) when `image` or this changes, never on a scale change alone."""

    def __post_init__(self) -> None:
        if self.image not in IMAGE_SOURCES:
            raise ConfigError(f"image_prompt.image must be one of {', '.join(IMAGE_SOURCES)}, got {self.image!r}")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= MAX_IMAGE_PROMPT_SCALE:
            raise ConfigError(f"image_prompt.scale must be a number in [0, {MAX_IMAGE_PROMPT_SCALE:g}], got {scale!r}")
        object.__setattr__(self, "scale", float(scale))


@dataclass(frozen=True)
class StreamParams:
    """What one stream asks of the engine; any field may change between frames."""

    prompt: str = "a watercolor painting, soft light"
    negative_prompt: str = ""
    """Used only when guidance > 1 (classifier-free guidance)."""
    strength: float = 0.5
    """How far the frame is noised before denoising: 0 keeps the input, 1 ignores it."""
    steps: int = 1
    """Denoising steps per frame, 1 (SD-Turbo) to 4 (LCM)."""
    t_index_list: tuple[int, ...] | None = None
    """Explicit timesteps (0-999, descending); overrides strength and steps when given."""
    seed: int = 42
    """Seeds the stream's fixed noise: the same seed and input give the same output."""
    guidance: float = 0.0
    """Classifier-free guidance scale; <= 1 disables it (SD-Turbo and LCM need none)."""
    blend_prompt: str = ""
    """A second prompt mixed into the first by `blend_weight`."""
    blend_weight: float = 0.0
    """0 uses `prompt` alone, 1 uses `blend_prompt` alone."""
    similarity_filter: bool = False
    """Skip frames that barely changed and repeat the previous output."""
    similarity_threshold: float = 0.98
    """Cosine similarity above which a frame may be skipped."""
    max_skip_frames: int = 10
    """Most consecutive frames the similarity filter may skip."""
    passthrough: bool = False
    """Return the input frame unchanged, no network run: measures transport alone."""
    temporal_bank: int = 0
    """Feature bank: how many earlier frames each self-attention layer of the UNet also attends to,
    0 (off) to 4; needs an engine with `EngineSettings.feature_bank` (see `livediff.engine.temporal`)."""
    temporal_weight: float = 1.0
    """Attention weight of the bank's frames against the current frame's, 0.1 to 10: 1 weighs them
    alike, more holds on to the past (steadier, slower to follow), less to the present."""
    motion_strength: tuple[float, float] | None = None
    """Motion-aware strength: (low, high) bounds, 0 < low <= high <= 1; the strength then follows a
    smoothed estimate of the camera's motion, `high` on a still scene and down to `low` as it moves
    fast (see `livediff.engine.temporal.MotionEstimate`), in place of `strength`. None: fixed strength."""
    controlnet: tuple[ControlParams, ...] = ()
    """ControlNets applied to this stream, 0 to `MAX_CONTROLNETS` (their residuals add up); each
    names one of the engine's (see `ControlParams`)."""
    loras: tuple[LoRAParams, ...] = ()
    """LoRAs applied to this stream, 0 to `MAX_LORAS` (their updates add up); each names one of the
    engine's (see `LoRAParams`). Changing them costs no reload and no recompile."""
    image_prompt: ImagePromptParams | None = None
    """The stream's image prompt (needs an engine with `EngineSettings.ip_adapter`); None: none."""

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"strength must be in (0, 1], got {self.strength}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if self.t_index_list is not None:
            ts = tuple(self.t_index_list)
            if not 1 <= len(ts) <= MAX_STEPS:
                raise ConfigError(f"t_index_list must have 1 to {MAX_STEPS} entries, got {len(ts)}")
            if any(not isinstance(t, int) or not 0 <= t <= 999 for t in ts):
                raise ConfigError("t_index_list entries must be integers in 0..999")
            if list(ts) != sorted(set(ts), reverse=True):
                raise ConfigError("t_index_list must be strictly descending")
            object.__setattr__(self, "t_index_list", ts)
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not 0.0 <= self.guidance <= 20.0:
            raise ConfigError(f"guidance must be in [0, 20], got {self.guidance}")
        if not 0.0 <= self.blend_weight <= 1.0:
            raise ConfigError(f"blend_weight must be in [0, 1], got {self.blend_weight}")
        if not 0.0 < self.similarity_threshold < 1.0:
            raise ConfigError(f"similarity_threshold must be in (0, 1), got {self.similarity_threshold}")
        if not 0 <= self.max_skip_frames <= 1000:
            raise ConfigError(f"max_skip_frames must be in 0..1000, got {self.max_skip_frames}")
        if isinstance(self.temporal_bank, bool) or not 0 <= self.temporal_bank <= MAX_BANK_FRAMES:
            raise ConfigError(f"temporal_bank must be an integer in 0..{MAX_BANK_FRAMES}, got {self.temporal_bank!r}")
        if not 0.1 <= self.temporal_weight <= 10.0:
            raise ConfigError(f"temporal_weight must be in [0.1, 10], got {self.temporal_weight}")
        if self.motion_strength is not None:
            bounds = tuple(self.motion_strength)
            if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
                raise ConfigError(f"motion_strength must be two numbers [low, high], got {self.motion_strength!r}")
            low, high = float(bounds[0]), float(bounds[1])
            if not 0.0 < low <= high <= 1.0:
                raise ConfigError(f"motion_strength must have 0 < low <= high <= 1, got [{low}, {high}]")
            if self.t_index_list is not None:
                raise ConfigError("motion_strength sets the timesteps from the strength; leave t_index_list empty")
            object.__setattr__(self, "motion_strength", (low, high))
        controls = tuple(self.controlnet)
        if len(controls) > MAX_CONTROLNETS:
            raise ConfigError(f"controlnet takes at most {MAX_CONTROLNETS} entries, got {len(controls)}")
        if any(not isinstance(c, ControlParams) for c in controls):
            raise ConfigError("controlnet entries must be ControlParams")
        object.__setattr__(self, "controlnet", controls)
        loras = tuple(self.loras)
        if len(loras) > MAX_LORAS:
            raise ConfigError(f"loras takes at most {MAX_LORAS} entries, got {len(loras)}")
        if any(not isinstance(lora, LoRAParams) for lora in loras):
            raise ConfigError("loras entries must be LoRAParams")
        object.__setattr__(self, "loras", loras)
        if self.image_prompt is not None and not isinstance(self.image_prompt, ImagePromptParams):
            raise ConfigError("image_prompt must be ImagePromptParams or None")

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The denoising timesteps, descending: explicit, or evenly spaced below `strength`.

        Trailing spacing as SD-Turbo and LCM use it: strength 0.5 with 1 step gives (499,),
        strength 1.0 with 2 steps gives (999, 499).
        """
        if self.t_index_list is not None:
            return self.t_index_list
        return self.timesteps_at(self.strength)

    def timesteps_at(self, strength: float) -> tuple[int, ...]:
        """The timesteps `steps` evenly spaced below `strength` (what `timesteps` gives at that strength)."""
        top = strength * 1000
        return tuple(max(0, round(top * (self.steps - k) / self.steps) - 1) for k in range(self.steps))

    def replace(self, **changes: Any) -> StreamParams:
        return dataclasses.replace(self, **changes)


VIDEO_CODECS = ("VP8", "H264")
"""The codecs the server sends and receives, in its default order of preference. VP8 first: at
512x512 aiortc's VP8 encoder takes about half the time of its H.264 one (4 vs 9 ms a frame here),
and Chromium's H.264 receive path held some frames for a whole frame interval where VP8 did not
(browser passthrough p95 40 vs 73 ms). Publishers that offer only H.264 (OBS) get H.264."""


@dataclass(frozen=True)
class ServerSettings:
    """`livediff serve`: the HTTP/WebRTC side. Engine settings stay in `EngineSettings`."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds to (0.0.0.0 to accept other machines)."""
    port: int = 8080
    token: str = ""
    """When set, signalling, API and viewer routes need `Authorization: Bearer <token>`."""
    max_sessions: int = 4
    """Publishing sessions at once; beyond it POST /offer and /whip answer 503 with Retry-After."""
    max_viewers: int = 16
    """WHEP viewers per session; beyond it POST /whep answers 503 with Retry-After."""
    max_connecting: int = 8
    """Peers that have not connected yet, at once, within `max_sessions` (and within `max_viewers` per
    session). Every 201 holds a slot; one whose peer has not connected a few seconds after its answer
    (`livediff.admission.CONNECT_GRACE_S`) gives it to the next offer and is ended, so offers whose
    answers are never applied cannot keep real clients out (livediff/admission.py)."""
    max_body_bytes: int = 64 * 1024
    """Largest request body (SDP, JSON); larger ones get 413."""
    tls_cert: Path | None = None
    """PEM certificate (chain) for https; with `tls_key`. None serves plain http."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    tls_self_signed: bool = False
    """Serve https with a certificate made here for this machine's names, kept in `state_dir`."""
    state_dir: Path | None = None
    """What the server keeps between runs (the self-signed certificate); None: $LIVEDIFF_STATE_DIR,
    else $XDG_STATE_HOME/livediff, else ~/.local/state/livediff."""
    cors_origins: tuple[str, ...] = ()
    """Origins (`https://app.example`) whose pages may call the API, WHIP and WHEP; `*` any; none by default."""
    ice_servers: tuple[str, ...] = ()
    """STUN/TURN urls (stun:host:3478, turn:host:3478?transport=udp) for the server's peers, the
    pages and WHIP/WHEP Link headers."""
    turn_username: str = ""
    """Static TURN username handed to every client (prefer `turn_secret`)."""
    turn_credential: str = ""
    """Static TURN password handed to every client (prefer `turn_secret`)."""
    turn_secret: str = ""
    """Shared secret of the TURN server (coturn `static-auth-secret`): each client gets its own
    short-lived credential (TURN REST scheme) instead of a static password."""
    turn_ttl_s: int = 86400
    """How long a short-lived TURN credential stays valid, in seconds."""
    nat_1to1: tuple[str, ...] = ()
    """Public addresses mapped 1:1 to this host's private ones (`PUBLIC` or `PRIVATE=PUBLIC`):
    the server's host candidates advertise the public address (cloud VMs behind 1:1 NAT)."""
    video_codecs: tuple[str, ...] = VIDEO_CODECS
    """Codec preference, first wins where the offer carries it: H264 and/or VP8."""
    bitrate: int = 1_500_000
    """Target video bitrate in bit/s (suits 512x512 at 30 fps); aiortc clamps it per codec."""
    keyframe_interval_s: float = 1.0
    """Seconds between forced keyframes (recovery after loss; a new viewer starts on a keyframe)."""
    marker_completion: bool = True
    """Complete received video frames on the RTP marker bit (one frame interval less latency)."""
    fresh_frames: bool = True
    """When the model is slower than the cameras, wait a moment for fresher frames rather than run
    stale ones (less glass-to-glass latency, a little lower output frame rate; see the scheduler)."""
    batch_by_deadline: bool | None = None
    """Take the largest batch whose step (measured per batch size at warm-up) fits every session's
    frame interval (`livediff.deadline`); None: on a CUDA engine only (on a CPU a step rarely fits)."""
    connect_timeout_s: float = 10.0
    """A peer that has not connected this long after its answer is reaped (ICE and DTLS take well under
    a second on a LAN and a few seconds through TURN; a slot that has not connected should cost little)."""
    ice_loopback: bool = False
    """ICE gathers 127.0.0.1 only: for measurements with every peer on this machine (`bench --g2g`)."""
    session_id_prefix: str = ""
    """Put before every session id; a cluster replica's route key (`livediff.cluster`), so that any
    entry point finds the replica of a session from its id alone. Letters, digits and `-`, at most 32."""
    cpu_threads: int = 0
    """torch threads when the engine runs on the CPU; 0 leaves one core to the video codecs (cores - 1)."""
    web_dir: Path = Path(__file__).resolve().parent.parent / "web"
    """Static pages: index.html (/), latency.html (/latency), view.html (/view/{id}); the checkout's web/."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if not 1 <= self.max_sessions <= 1024:
            raise ConfigError(f"max_sessions must be in 1..1024, got {self.max_sessions}")
        if not 0 <= self.max_viewers <= 1024:
            raise ConfigError(f"max_viewers must be in 0..1024, got {self.max_viewers}")
        if not 1 <= self.max_connecting <= 1024:
            raise ConfigError(f"max_connecting must be in 1..1024, got {self.max_connecting}")
        if not 1024 <= self.max_body_bytes <= 16 * 1024 * 1024:
            raise ConfigError(f"max_body_bytes must be in 1024..16777216, got {self.max_body_bytes}")
        codecs = tuple(c.upper() for c in self.video_codecs)
        if not codecs or any(c not in VIDEO_CODECS for c in codecs):
            raise ConfigError(
                f"video_codecs must be one or more of {', '.join(VIDEO_CODECS)}, got {self.video_codecs!r}"
            )
        object.__setattr__(self, "video_codecs", codecs)
        for url in self.ice_servers:
            if not url.startswith(("stun:", "turn:", "turns:")):
                raise ConfigError(f"ice_servers entries must start with stun:, turn: or turns:, got {url!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.tls_self_signed and self.tls_cert is not None:
            raise ConfigError("tls_self_signed and tls_cert exclude each other: make a certificate or bring one")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(f"cors_origins entries must be * or http(s)://host[:port], got {origin!r}")
        if self.turn_secret and self.turn_username:
            raise ConfigError("turn_secret and turn_username exclude each other: short-lived or static credentials")
        if not 60 <= self.turn_ttl_s <= 7 * 86400:
            raise ConfigError(f"turn_ttl_s must be in 60..604800 seconds, got {self.turn_ttl_s}")
        nat_1to1_map(self.nat_1to1)  # raises ConfigError naming the bad entry
        if not 100_000 <= self.bitrate <= 50_000_000:
            raise ConfigError(f"bitrate must be in 100000..50000000 bit/s, got {self.bitrate}")
        if not 0.1 <= self.keyframe_interval_s <= 60:
            raise ConfigError(f"keyframe_interval_s must be in [0.1, 60], got {self.keyframe_interval_s}")
        if len(self.session_id_prefix) > 32 or not all(
            c.isascii() and (c.isalnum() or c == "-") for c in self.session_id_prefix
        ):
            raise ConfigError(
                f"session_id_prefix must be at most 32 letters, digits or -, got {self.session_id_prefix!r}"
            )
        if not 0 <= self.cpu_threads <= 1024:
            raise ConfigError(f"cpu_threads must be in 0..1024, got {self.cpu_threads}")
        if not 1 <= self.connect_timeout_s <= 600:
            raise ConfigError(f"connect_timeout_s must be in [1, 600], got {self.connect_timeout_s}")

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None or self.tls_self_signed else "http"

    def replace(self, **changes: Any) -> ServerSettings:
        return dataclasses.replace(self, **changes)


def nat_1to1_map(entries: Iterable[str]) -> dict[str, str]:
    """NAT 1:1 entries as a private -> public address map.

    An entry is `PUBLIC` (every private IPv4 host address maps to it: the usual single-interface
    cloud VM), stored under the key `"*"`, or `PRIVATE=PUBLIC`. Raises ConfigError naming the
    entry when an address is not an IP address or the two are of different families.
    """
    mapping: dict[str, str] = {}
    for entry in entries:
        private, sep, public = entry.strip().partition("=")
        if not sep:
            private, public = "*", private
        try:
            public_ip = ipaddress.ip_address(public)
            private_ip = None if private == "*" else ipaddress.ip_address(private)
        except ValueError:
            raise ConfigError(f"nat_1to1: {entry!r} is not PUBLIC_IP or PRIVATE_IP=PUBLIC_IP") from None
        if private_ip is None and public_ip.version != 4:
            raise ConfigError(f"nat_1to1: {entry!r}: map an IPv6 address as PRIVATE=PUBLIC")
        if private_ip is not None and private_ip.version != public_ip.version:
            raise ConfigError(f"nat_1to1: {entry!r} maps between IPv4 and IPv6")
        mapping[str(private_ip) if private_ip else "*"] = str(public_ip)
    return mapping
