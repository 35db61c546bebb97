"""Generate a small synthetic face dataset in the CMU 11-785 HW2P2 layout.

Every identity is a set of drawn face traits (face shape, skin tone, eye spacing and size,
eye colour, brows, nose, mouth, hair colour and style, beard, glasses); every image of it
varies pose (shift, rotation), scale, expression, background, lighting, blur, noise and
JPEG quality. The layout is the one the HW2P2 write-up describes (section 4.1)::

    <out>/classification/
        train/<identity>/<image>.jpg      ImageFolder: one folder per identity
        dev/<identity>/<image>.jpg
        test/<identity>/<image>.jpg       identity folders as in the write-up; names unique
        classification_sample_submission.csv     id,label  (id = test image file name)
    <out>/verification/
        known/<identity>/<image>.jpg      the gallery: identities unseen in classification
        unknown_dev/<image>.jpg           flat probes, ground truth in verification_dev.csv
        unknown_test/<image>.jpg          flat probes to submit predictions for
        verification_dev.csv              id,label  for the sorted unknown_dev images
        verification_sample_submission.csv      id,label  for the sorted unknown_test images
    <out>/toy_faces.json                  the arguments that generated it

Identities are named like VGGFace2's (``n000123``); ``n000000`` is reserved for "no
correspondence", the label of unknown images whose identity is not in ``known``. The
write-up does not name the CSV columns; the toy uses ``id,label`` (Kaggle's usual pair)
and fills ``id`` with the image file name, which for the verification files (named
``0000.jpg``, ``0001.jpg``, ...) is also the index into the sorted folder that the write-up
mentions. The sample submissions hold placeholder labels.

Everything is deterministic given ``--seed``: identity traits depend only on the seed and
the identity's index, image variations on the seed, identity, split and image index.

Run ``python examples/face/make_toy_faces.py --out data/toy_faces``; ``--help`` lists every knob.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NO_MATCH_LABEL = "n000000"

# Skin tones from light to dark (RGB); identities interpolate between neighbours.
_SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 155], [224, 172, 125], [198, 134, 90], [141, 85, 54], [92, 58, 40]],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [[20, 17, 15], [60, 40, 25], [110, 70, 40], [185, 150, 90], [230, 205, 140], [160, 60, 30], [170, 170, 170], [240, 240, 235]],
    dtype=np.float64,
)
_EYE_COLOURS = np.array([[70, 40, 20], [40, 90, 160], [60, 120, 70], [110, 110, 120], [20, 20, 20]], dtype=np.float64)
_HAIR_STYLES = ("short", "long", "bald", "fringe", "tall", "parted")


@dataclass(frozen=True)
class Traits:
    """What defines one identity: everything its images keep fixed.

    Lengths are fractions of the image side; colours are RGB in [0, 255].
    """

    face_w: float
    face_h: float
    jaw: float
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: str
    hair_volume: float
    eye_colour: tuple[float, float, float]
    eye_y: float
    eye_dx: float
    eye_r: float
    brow_thick: float
    brow_tilt: float
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    mouth_thick: float
    smile: float
    lips: tuple[float, float, float]
    beard: bool
    glasses: bool
    ear_r: float


def _colour(values: np.ndarray) -> tuple[float, float, float]:
    red, green, blue = np.clip(values, 0, 255).tolist()
    return (red, green, blue)


def identity_traits(rng: np.random.Generator) -> Traits:
    """Draw the traits of one identity."""
    tone = rng.uniform(0, len(_SKIN_TONES) - 1)
    low = min(int(tone), len(_SKIN_TONES) - 2)
    skin = _SKIN_TONES[low] + (tone - low) * (_SKIN_TONES[low + 1] - _SKIN_TONES[low]) + rng.normal(0, 8, 3)
    return Traits(
        face_w=rng.uniform(0.24, 0.34),
        face_h=rng.uniform(0.32, 0.42),
        jaw=rng.uniform(0.0, 1.0),
        skin=_colour(skin),
        hair=_colour(_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.normal(0, 15, 3)),
        hair_style=_HAIR_STYLES[rng.integers(len(_HAIR_STYLES))],
        hair_volume=rng.uniform(0.02, 0.08),
        eye_colour=_colour(_EYE_COLOURS[rng.integers(len(_EYE_COLOURS))] + rng.normal(0, 10, 3)),
        eye_y=rng.uniform(-0.10, -0.02),
        eye_dx=rng.uniform(0.08, 0.14),
        eye_r=rng.uniform(0.022, 0.042),
        brow_thick=rng.uniform(0.008, 0.024),
        brow_tilt=rng.uniform(-0.02, 0.02),
        nose_len=rng.uniform(0.05, 0.12),
        nose_w=rng.uniform(0.015, 0.05),
        mouth_y=rng.uniform(0.14, 0.22),
        mouth_w=rng.uniform(0.06, 0.14),
        mouth_thick=rng.uniform(0.01, 0.028),
        smile=rng.uniform(-0.01, 0.04),
        lips=_colour(skin * rng.uniform(0.55, 0.8) + np.array([40.0, 0.0, 0.0]) * rng.uniform(0, 1)),
        beard=bool(rng.random() < 0.25),
        glasses=bool(rng.random() < 0.2),
        ear_r=rng.uniform(0.03, 0.06),
    )


def _rgb(colour: Sequence[float], factor: float = 1.0) -> tuple[int, int, int]:
    red, green, blue = (int(np.clip(value * factor, 0, 255)) for value in colour)
    return (red, green, blue)


def render_face(traits: Traits, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw one image of the identity ``traits`` with random pose, lighting and noise."""
    t = traits
    canvas = 2 * image_size  # draw at 2x, downsample once: cheap anti-aliasing
    layer = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    def box(cx: float, cy: float, rx: float, ry: float) -> list[float]:
        return [(cx - rx) * canvas, (cy - ry) * canvas, (cx + rx) * canvas, (cy + ry) * canvas]

    def line(*points: tuple[float, float]) -> list[tuple[float, float]]:
        return [(x * canvas, y * canvas) for x, y in points]

    cx, cy, fw, fh = 0.5, 0.52, t.face_w, t.face_h
    skin, shade, hair = _rgb(t.skin), _rgb(t.skin, 0.82), _rgb(t.hair)
    style, volume = t.hair_style, t.hair_volume

    if style == "long":  # hair behind the head down to the shoulders
        draw.rounded_rectangle(box(cx, cy + 0.1, fw + volume + 0.03, fh + 0.12), radius=0.2 * canvas, fill=hair)
    draw.rectangle(box(cx, cy + fh + 0.1, fw * 0.45, 0.14), fill=shade)  # neck
    for side in (-1, 1):
        draw.ellipse(box(cx + side * fw * 0.98, cy, t.ear_r * 0.7, t.ear_r), fill=shade)
    draw.ellipse(box(cx, cy, fw, fh), fill=skin)
    if t.jaw > 0.5:  # square-jawed identities: a rounded rectangle over the lower face
        draw.rounded_rectangle(box(cx, cy + fh * 0.35, fw * (0.55 + 0.35 * t.jaw), fh * 0.55), radius=0.06 * canvas, fill=skin)
    if t.beard:
        draw.chord(box(cx, cy + 0.02, fw * 0.98, fh * 0.98), 20, 160, fill=hair)
        draw.ellipse(box(cx, cy + t.mouth_y, t.mouth_w + 0.02, 0.035), fill=skin)

    top = cy - fh
    if style == "bald":  # a little hair on the sides only
        for side in (-1, 1):
            draw.ellipse(box(cx + side * fw * 0.9, cy - fh * 0.2, 0.03, 0.08), fill=hair)
    else:
        lift = volume + (0.08 if style == "tall" else 0.0)
        draw.chord(box(cx, cy - fh * 0.25, fw + volume * 0.6, fh * 0.75 + lift), 180, 360, fill=hair)
        if style == "fringe":
            draw.rectangle(box(cx, top + 0.1, fw * 0.85, 0.06), fill=hair)
        if style == "parted":  # a central parting: symmetric, so horizontal flips keep it
            draw.line(line((cx, top - lift), (cx, top + 0.1)), fill=skin, width=max(1, canvas // 60))
        if style == "long":
            for side in (-1, 1):
                draw.rectangle(box(cx + side * (fw + 0.005), cy + 0.02, 0.03 + volume * 0.5, fh * 0.7), fill=hair)

    openness = 1.0 if rng.random() > 0.08 else 0.25  # an occasional blink
    gaze = rng.uniform(-0.3, 0.3) * t.eye_r
    iris, pupil = t.eye_r * 0.75 * openness, t.eye_r * 0.3 * openness
    for side in (-1, 1):
        ex, ey = cx + side * t.eye_dx, cy + t.eye_y
        draw.ellipse(box(ex, ey, t.eye_r * 1.4, t.eye_r * openness), fill=(245, 245, 240))
        draw.ellipse(box(ex + gaze, ey, iris, iris), fill=_rgb(t.eye_colour))
        draw.ellipse(box(ex + gaze, ey, pupil, pupil), fill=(10, 10, 10))
        brow_y, brow_dx = ey - t.eye_r * 1.8, side * t.eye_r * 1.5
        draw.line(
            line((ex - brow_dx, brow_y + t.brow_tilt), (ex + brow_dx, brow_y - t.brow_tilt)),
            fill=hair, width=max(1, int(t.brow_thick * canvas)),
        )
    if t.glasses:
        width, rim = max(1, canvas // 64), t.eye_r * 2.1
        for side in (-1, 1):
            draw.ellipse(box(cx + side * t.eye_dx, cy + t.eye_y, rim, t.eye_r * 1.8), outline=(30, 30, 30), width=width)
        bridge_y = cy + t.eye_y
        draw.line(line((cx - t.eye_dx + rim, bridge_y), (cx + t.eye_dx - rim, bridge_y)), fill=(30, 30, 30), width=width)

    nose_top = cy + t.eye_y + 0.02
    nose_tip = nose_top + t.nose_len
    draw.polygon(line((cx, nose_top), (cx - t.nose_w, nose_tip), (cx + t.nose_w, nose_tip)), fill=_rgb(t.skin, 0.72))

    smile = t.smile + rng.uniform(-0.015, 0.015)  # expression varies a little per image
    mouth = [(cx + x * t.mouth_w, cy + t.mouth_y + smile * (x * x - 1)) for x in np.linspace(-1, 1, 9).tolist()]
    draw.line(line(*mouth), fill=_rgb(t.lips), width=max(1, int(t.mouth_thick * canvas)), joint="curve")

    # Pose: rotate, scale and shift the face layer with one affine map (output -> input coords).
    angle = math.radians(rng.uniform(-12, 12))
    scale = rng.uniform(0.88, 1.12)
    shift_x, shift_y = (rng.uniform(-0.06, 0.06, 2) * canvas).tolist()
    cos_a, sin_a = math.cos(angle) / scale, math.sin(angle) / scale
    centre = canvas / 2
    ox, oy = centre + shift_x, centre + shift_y
    coeffs = (cos_a, sin_a, centre - cos_a * ox - sin_a * oy, -sin_a, cos_a, centre + sin_a * ox - cos_a * oy)
    layer = layer.transform((canvas, canvas), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)

    # Background: a vertical blend between two random colours.
    blend = np.linspace(0, 1, canvas)[:, None, None]
    colours = rng.uniform(30, 225, (2, 3))
    background = (colours[0] * (1 - blend) + colours[1] * blend).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(background, (canvas, canvas, 3)).copy(), "RGB")
    image.paste(layer, (0, 0), layer)
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))

    # Lighting: a global gain, a colour cast and a linear ramp from a random direction; noise.
    pixels = np.asarray(image, dtype=np.float64)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, image_size)
    ramp_map = math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None]
    gain = rng.uniform(0.75, 1.2) * (1 + rng.uniform(0.0, 0.25) * ramp_map)[..., None]
    cast = 1 + rng.normal(0, 0.04, 3)
    pixels = pixels * gain * cast + rng.normal(0, rng.uniform(1, 8), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _save(image: Image.Image, path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=int(rng.integers(70, 96)))


def _write_csv(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows(rows)


def _identity_names(count: int, seed: int) -> list[str]:
    """Distinct, non-contiguous ids like VGGFace2's (``n000000`` is never used)."""
    rng = np.random.default_rng([seed, 0xFACE])
    numbers = rng.choice(np.arange(1, 10_000), size=count, replace=False)
    return [f"n{int(number):06d}" for number in numbers]


# --smoke: a seconds-long data set for CI (what `demo.py --smoke` uses).
SMOKE = {
    "num_identities": 4, "images_per_identity": 4, "dev_per_identity": 1, "test_per_identity": 1,
    "known_identities": 3, "unmatched_identities": 1, "unknown_dev": 4, "unknown_test": 4, "image_size": 32,
}


def generate(
    out: Path,
    *,
    num_identities: int = 80,
    images_per_identity: int = 30,
    dev_per_identity: int = 4,
    test_per_identity: int = 4,
    known_identities: int = 30,
    known_images: int = 1,
    unmatched_identities: int = 6,
    unknown_dev: int = 120,
    unknown_test: int = 120,
    image_size: int = 32,
    seed: int = 0,
) -> dict[str, object]:
    """Write the dataset under ``out`` and return the settings (also saved to ``toy_faces.json``)."""
    for name, value, low in [
        ("num_identities", num_identities, 2), ("images_per_identity", images_per_identity, 1),
        ("dev_per_identity", dev_per_identity, 1), ("test_per_identity", test_per_identity, 1),
        ("known_identities", known_identities, 1), ("known_images", known_images, 1),
        ("unmatched_identities", unmatched_identities, 0), ("unknown_dev", unknown_dev, 1),
        ("unknown_test", unknown_test, 1), ("image_size", image_size, 16),
    ]:
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value!r}")
    settings: dict[str, object] = {
        "num_identities": num_identities, "images_per_identity": images_per_identity,
        "dev_per_identity": dev_per_identity, "test_per_identity": test_per_identity,
        "known_identities": known_identities, "known_images": known_images,
        "unmatched_identities": unmatched_identities, "unknown_dev": unknown_dev,
        "unknown_test": unknown_test, "image_size": image_size, "seed": seed,
    }
    total = num_identities + known_identities + unmatched_identities
    names = _identity_names(total, seed)
    traits = [identity_traits(np.random.default_rng([seed, 1, index])) for index in range(total)]

    def draw(identity: int, split: int, index: int) -> tuple[Image.Image, np.random.Generator]:
        rng = np.random.default_rng([seed, 2, identity, split, index])
        return render_face(traits[identity], rng, image_size), rng

    classification = out / "classification"
    test_rows: list[tuple[str, str]] = []
    test_counter = 0
    for identity in range(num_identities):
        for split, (folder, count) in enumerate([("train", images_per_identity), ("dev", dev_per_identity), ("test", test_per_identity)]):
            for index in range(count):
                image, rng = draw(identity, split, index)
                if folder == "test":  # unique names: the submission's id column is the file name
                    file_name = f"{test_counter:05d}.jpg"
                    test_counter += 1
                    test_rows.append((file_name, "0"))
                else:
                    file_name = f"{index + 1:04d}_01.jpg"
                _save(image, classification / folder / names[identity] / file_name, rng)
    _write_csv(classification / "classification_sample_submission.csv", sorted(test_rows))

    verification = out / "verification"
    known = list(range(num_identities, num_identities + known_identities))
    unmatched = list(range(num_identities + known_identities, total))
    for identity in known:
        for index in range(known_images):
            image, rng = draw(identity, 3, index)
            _save(image, verification / "known" / names[identity] / f"{index + 1:04d}_01.jpg", rng)
    for split, (folder, count) in enumerate([("unknown_dev", unknown_dev), ("unknown_test", unknown_test)], start=4):
        picker = np.random.default_rng([seed, 3, split])
        rows: list[tuple[str, str]] = []
        (verification / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            identity = int(picker.choice(known + unmatched))
            image, rng = draw(identity, split, index)
            file_name = f"{index:04d}.jpg"
            _save(image, verification / folder / file_name, rng)
            rows.append((file_name, names[identity] if identity in known else NO_MATCH_LABEL))
        if folder == "unknown_dev":
            _write_csv(verification / "verification_dev.csv", rows)
        else:
            _write_csv(verification / "verification_sample_submission.csv", [(name, NO_MATCH_LABEL) for name, _ in rows])
    (out / "toy_faces.json").write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes the HW2P2 folder layout (see the module docstring or examples/face/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset root to create (classification/, verification/ go under it)")
    parser.add_argument("--num-identities", type=int, default=80, help="classification identities (train/dev/test classes)")
    parser.add_argument("--images-per-identity", type=int, default=30, help="train images per classification identity")
    parser.add_argument("--dev-per-identity", type=int, default=4, help="dev images per classification identity")
    parser.add_argument("--test-per-identity", type=int, default=4, help="test images per classification identity")
    parser.add_argument("--known-identities", type=int, default=30, help="verification gallery identities (disjoint from classification)")
    parser.add_argument("--known-images", type=int, default=1, help="gallery images per known identity")
    parser.add_argument("--unmatched-identities", type=int, default=6, help=f"identities that appear among the unknown images but not in known (label {NO_MATCH_LABEL})")
    parser.add_argument("--unknown-dev", type=int, default=120, help="images in verification/unknown_dev")
    parser.add_argument("--unknown-test", type=int, default=120, help="images in verification/unknown_test")
    parser.add_argument("--image-size", type=int, default=32, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data set for CI (" + ", ".join(f"{k}={v}" for k, v in SMOKE.items()) + "), overriding the sizes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        print(f"error: {args.out} exists and is not empty (pass --force to write into it)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    sizes = {
        "num_identities": args.num_identities, "images_per_identity": args.images_per_identity,
        "dev_per_identity": args.dev_per_identity, "test_per_identity": args.test_per_identity,
        "known_identities": args.known_identities, "known_images": args.known_images,
        "unmatched_identities": args.unmatched_identities, "unknown_dev": args.unknown_dev,
        "unknown_test": args.unknown_test, "image_size": args.image_size,
    }
    if args.smoke:
        sizes.update(SMOKE)
    try:
        settings = generate(args.out, seed=args.seed, **sizes)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images = sum(1 for _ in args.out.rglob("*.jpg"))
    print(f"wrote {images} images of {settings['num_identities']} + {settings['known_identities']} + "
          f"{settings['unmatched_identities']} identities to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
