"""An embedded demo dataset: characters rendered from the fonts that matplotlib ships.

:func:`make_demo_dataset` generates, offline and deterministically, a recognition dataset with
one class per character (Latin, Greek and Cyrillic letters, digits, symbols, punctuation, IPA
letters and letters with diacritics). Every image shows one character in a randomly chosen font
(DejaVu Sans / Serif / Sans Mono and STIX General, regular, bold, oblique and bold oblique),
under a random affine distortion (rotation, scale, shear, translation), with random foreground
and background intensities (dark ink on a lighter background) and Gaussian noise. The images are small grayscale
PNGs; :class:`recognite.data.DataFrameDataset` converts them to RGB when loading.

The class list was chosen so that classes look different: every character must exist in all
fonts and render a glyph of reasonable size, and characters that look alike in some font after
scaling to the same box (``O`` / ``0`` / ``o``, Latin ``A`` / Greek ``Α``, ``l`` / ``I`` /
``|``, ...) are represented by only one of them. Classes come in the order of
:data:`_GLYPHS`: Latin letters and digits first, letters with diacritics last.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["default_demo_root", "make_demo_dataset"]

logger = logging.getLogger(__name__)

# Bump when the generated images change for the same parameters (invalidates caches).
_GENERATOR_VERSION = 2

_MANIFEST = "demo.json"
_CSV = "demo.csv"
_IMAGES = "images"
_OWNER_MARK = ".recognite-demo"  # inside images/: marks the folder as ours to replace

_IMPORT_ERROR = (
    "The demo dataset renders glyphs with the fonts that matplotlib ships: "
    "pip install 'recognite[demo]'"
)

# Fonts from matplotlib's mpl-data/fonts/ttf.
_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)

# The characters of the demo classes, in class order. Selected offline from the characters
# that all of _FONT_FILES cover (matplotlib 3.10): glyphs whose ink box is at least 0.3 em in
# every font, without modifier letters, super/subscripts, box drawings and ligatures; then,
# greedily in the order below, every character whose glyph differs from all kept ones in every
# font (soft Jaccard distance >= 0.18 between the glyphs scaled to a 24 x 24 box). Lower-case
# letters whose upper case is also a class and has the same shape (c, o, s, u, w, z, ø and
# Cyrillic и, к, г, ґ with diacritics) were then removed, since images are scaled to a common
# glyph size.
# tests/data/test_demo.py checks that these classes render distinctly.
_GLYPHS = "".join(
    (
        # Latin letters and digits (47)
        "0123456789ACDEGHIJKLMNPQRSTUVWXYZabdefghkmnprty",
        # Greek (36)
        "ΓΔΞΣΦΨΩαβδεζηιλμνξςσυφωϑϕϖϘϚϝϞϟϠϡϰϱϵ",
        # Cyrillic (30)
        "ЁЂЃЇЉЊЋЌЎЏБДЖЙЛЧШЩЪЫЭЮЯвицьёђѣ",
        # symbols (22)
        "$+<=>~¢£¤¥¦©¬®±×÷€№™∂␣",
        # punctuation (32)
        "#%&()*/;?@[\\]{}§«¶»¼½¿“”‟†•…‰‱‹›",
        # other letters: IPA, Latin extended (37)
        "ÆÞßæðŉŊƕƪǂɐɔɘəɣɥɮɶɷɹʁʅʇʉʊʍʎʒʔʕʖʚʞʣʤʦʧ",
        # letters with diacritics (104)
        "ÀÇÑÒØÙÝàåìíîñúýāĄąĆĉĎďĘęĜĝĢĤĥĩĮĴĵĶķĹĺĻļŀŅņŔŖŗ",
        "řŚŞţŤťŴŹżƈƠƯƺƾǼǽǾɕɖɚɝɟɠɧɨɫɬɰɱɲɻɽɾɿʂʄʆʐʑʛʝʥ",
        "ʨΈΉΊΌΎΐάέήίΰϊϋώϒҐ",
    )
)

# Random distortions of every image.
_MAX_ROTATION_DEG = 15.0
_GLYPH_EXTENT = (0.5, 0.8)  # longest side of the glyph, as a fraction of the image size
_ASPECT_JITTER = 0.1  # relative change of the glyph's height vs width
_MAX_SHEAR = 0.2  # horizontal shear factor
_MAX_SHIFT = 0.08  # translation of the glyph centre, as a fraction of the image size
_MIN_CONTRAST = 0.45  # background - foreground in [0, 1] intensity
_MAX_INK = 0.4  # darkest-possible ink up to this intensity
_NOISE_STD = (0.0, 0.08)  # Gaussian noise standard deviation in [0, 1] intensity
_MIN_GLYPH_EM = 0.3  # smallest accepted ink box, in em


def default_demo_root() -> Path:
    """Folder where ``recognite demo`` keeps the demo dataset.

    ``$RECOGNITE_CACHE/demo`` when the environment variable ``RECOGNITE_CACHE`` is set, else
    ``$XDG_CACHE_HOME/recognite/demo``, else ``~/.cache/recognite/demo``.

    Returns:
        The folder (it is not created).
    """
    cache = os.environ.get("RECOGNITE_CACHE")
    if cache:
        return Path(cache).expanduser() / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "recognite" / "demo"


def _font_dir() -> Path:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(_IMPORT_ERROR) from err
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _font_paths() -> list[Path]:
    font_dir = _font_dir()
    paths = [font_dir / name for name in _FONT_FILES if (font_dir / name).is_file()]
    if not paths:
        raise FileNotFoundError(
            f"None of the demo fonts ({', '.join(_FONT_FILES)}) were found in {font_dir}; "
            "reinstall matplotlib: pip install --force-reinstall 'recognite[demo]'"
        )
    return paths


def _covered_glyphs(font_paths: list[Path]) -> str:
    """The characters of :data:`_GLYPHS` that every font maps to a glyph."""
    try:
        from fontTools.ttLib import TTFont  # a dependency of matplotlib
    except ImportError as err:
        raise ImportError(_IMPORT_ERROR) from err
    covered = set(map(ord, _GLYPHS))
    for path in font_paths:
        with TTFont(path, lazy=True) as font:
            covered &= set(font.getBestCmap())
    return "".join(ch for ch in _GLYPHS if ord(ch) in covered)


def _render_glyph(font: Any, char: str) -> np.ndarray | None:
    """Ink of ``char`` in ``font`` cropped to its bounding box, ``(H, W)`` uint8; None if empty."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), char, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        return None
    return np.asarray(canvas.crop(box))


def _glyph_masks(
    num_classes: int, render_size: int
) -> tuple[list[str], list[str], list[list[np.ndarray]]]:
    """The first ``num_classes`` usable characters, the font names and their glyph masks.

    Returns:
        ``(chars, font_names, masks)`` with ``masks[c][f]`` the ``(H, W)`` uint8 ink of
        character ``c`` in font ``f``.

    Raises:
        ValueError: Fewer than ``num_classes`` characters render in all fonts.
    """
    from PIL import ImageFont

    font_paths = _font_paths()
    fonts = [ImageFont.truetype(str(path), render_size) for path in font_paths]
    min_extent = _MIN_GLYPH_EM * render_size
    chars: list[str] = []
    masks: list[list[np.ndarray]] = []
    candidates = _covered_glyphs(font_paths)
    for char in candidates:
        rendered = [_render_glyph(font, char) for font in fonts]
        if any(m is None or max(m.shape) < min_extent for m in rendered):
            logger.debug("demo dataset: skipping %r, too small or empty in some font", char)
            continue
        chars.append(char)
        masks.append(rendered)  # type: ignore[arg-type]
        if len(chars) == num_classes:
            break
    if len(chars) < num_classes:
        raise ValueError(
            f"num_classes={num_classes} is more than the {len(chars)} characters that the "
            f"installed fonts render distinctly; choose num_classes <= {len(chars)}"
        )
    return chars, [path.stem for path in font_paths], masks


def _class_label(char: str) -> str:
    return f"U+{ord(char):04X}"


def _distort(mask: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Place a glyph mask ``(H, W)`` in an ``(S, S)`` float image in [0, 1], randomly warped."""
    from PIL import Image

    height, width = mask.shape
    extent = rng.uniform(*_GLYPH_EXTENT) * image_size / max(height, width)
    aspect = math.exp(rng.uniform(-_ASPECT_JITTER, _ASPECT_JITTER))
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    shear = rng.uniform(-_MAX_SHEAR, _MAX_SHEAR)
    shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=2) * image_size
    cos, sin = math.cos(angle), math.sin(angle)
    # forward map (mask pixel -> image pixel): shift . rotate . shear . scale . centre
    scale = np.diag([extent * aspect, extent / aspect])
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ scale
    centre_out = np.array([image_size / 2, image_size / 2]) + shift
    centre_in = np.array([width / 2, height / 2])
    inverse = np.linalg.inv(linear)
    offset = centre_in - inverse @ centre_out
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    warped = Image.fromarray(mask).transform(
        (image_size, image_size),
        Image.Transform.AFFINE,
        coeffs,
        resample=Image.Resampling.BILINEAR,
        fillcolor=0,
    )
    return np.asarray(warped, dtype=np.float32) / 255.0


def _render_image(masks: list[np.ndarray], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One demo image ``(S, S)`` uint8 of a character given its masks in every font."""
    mask = masks[int(rng.integers(len(masks)))]
    ink = _distort(mask, image_size, rng)
    # Dark ink on a light background, like print: the identity of a glyph does not depend on
    # contrast polarity, and a demo that must also learn polarity invariance trains much slower.
    foreground = rng.uniform(0.0, _MAX_INK)
    background = rng.uniform(foreground + _MIN_CONTRAST, 1.0)
    noise_std = rng.uniform(*_NOISE_STD)
    image = background + (foreground - background) * ink
    image += noise_std * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        with open(root / _MANIFEST, encoding="utf-8") as file:
            manifest = json.load(file)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    manifest = _read_manifest(root)
    return (
        manifest is not None
        and manifest.get("params") == params
        and (root / _CSV).is_file()
        and (root / _IMAGES).is_dir()
    )


@contextlib.contextmanager
def _folder_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on ``root`` across processes (POSIX; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(root / ".demo.lock", "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _generate(out_dir: Path, params: dict[str, Any], progress: bool) -> None:
    """Write images/, demo.csv and demo.json for ``params`` into the empty ``out_dir``."""
    from PIL import Image
    from tqdm.auto import tqdm

    num_classes = params["num_classes"]
    images_per_class = params["images_per_class"]
    image_size = params["image_size"]
    seed = params["seed"]
    render_size = max(24, round(1.25 * image_size))
    chars, font_names, masks = _glyph_masks(num_classes, render_size)

    image_dir = out_dir / _IMAGES
    image_dir.mkdir()
    (image_dir / _OWNER_MARK).touch()
    rows: list[tuple[str, str]] = []
    with tqdm(
        total=num_classes * images_per_class, desc="demo dataset", unit="img", disable=not progress
    ) as bar:
        for class_index, char in enumerate(chars):
            label = _class_label(char)
            (image_dir / label).mkdir()
            for n in range(images_per_class):
                # one generator per image: an image depends only on (seed, class, n)
                rng = np.random.default_rng([seed, class_index, n])
                pixels = _render_image(masks[class_index], image_size, rng)
                relative = f"{_IMAGES}/{label}/{n}.png"
                Image.fromarray(pixels).save(out_dir / relative, compress_level=1)
                rows.append((relative, label))
                bar.update(1)

    with open(out_dir / _CSV, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    manifest = {
        "params": params,
        "num_images": len(rows),
        "fonts": font_names,
        "classes": [
            {"label": _class_label(c), "char": c, "name": unicodedata.name(c, "")} for c in chars
        ],
    }
    with open(out_dir / _MANIFEST, "w", encoding="utf-8") as file:
        json.dump(manifest, file, ensure_ascii=False, indent=1)


def _install(root: Path, new_dir: Path) -> None:
    """Replace root's images/, demo.csv and demo.json by those in ``new_dir``.

    The manifest goes first (invalidating the cache) and comes back last, so an interrupted
    swap is never mistaken for a complete dataset.
    """
    (root / _MANIFEST).unlink(missing_ok=True)
    old_images = None
    if (root / _IMAGES).exists():
        old_images = Path(tempfile.mkdtemp(prefix=".demo-old-", dir=root))
        os.replace(root / _IMAGES, old_images / _IMAGES)
    os.replace(new_dir / _IMAGES, root / _IMAGES)
    os.replace(new_dir / _CSV, root / _CSV)
    os.replace(new_dir / _MANIFEST, root / _MANIFEST)
    if old_images is not None:
        shutil.rmtree(old_images, ignore_errors=True)


def make_demo_dataset(
    root: str | os.PathLike[str] | None = None,
    num_classes: int = 300,
    images_per_class: int = 20,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate the demo dataset (or find it already generated) and return its CSV file.

    Writes ``root/images/<label>/<n>.png`` (grayscale PNGs of ``image_size`` pixels square),
    ``root/demo.csv`` with columns ``image`` (path relative to ``root``) and ``label`` (the
    character's code point, e.g. ``U+03B1``; ``demo.json`` lists each class's character and
    Unicode name) and the manifest ``root/demo.json``. When ``root`` already holds a complete
    dataset made with the same parameters, nothing is written and the CSV path is returned at
    once. The images depend only on the parameters (image ``n`` of class ``c`` only on
    ``seed``, ``c``, ``n`` and ``image_size``), not on the machine's random state.

    The dataset is generated in a temporary folder inside ``root`` and then moved into place,
    under a file lock, so concurrent calls (e.g. from several ``torchrun`` processes) and
    interrupted runs never leave a half-written dataset that looks complete.

    Args:
        root: Output folder, created if needed. Default: :func:`default_demo_root`.
        num_classes: Number of classes (characters); at most about 320, depending on the
            installed fonts.
        images_per_class: Images per class, >= 1.
        image_size: Side of the square images in pixels, in [16, 512].
        seed: Seed of the random distortions, >= 0.
        overwrite: Regenerate even when a matching dataset exists, and replace an ``images``
            folder or ``demo.csv`` in ``root`` that this function did not write.
        progress: Show a tqdm progress bar while generating.

    Returns:
        Path of ``root/demo.csv``, ready for
        :func:`recognite.data.train_val_datasets`.

    Raises:
        ImportError: matplotlib (the source of the fonts) is not installed.
        ValueError: A bad argument, or more classes than the fonts render distinctly.
        FileExistsError: ``root`` holds an ``images`` folder or ``demo.csv`` that is not a demo
            dataset, and ``overwrite`` is False.
    """
    num_classes = _check_int("num_classes", num_classes, 2)
    images_per_class = _check_int("images_per_class", images_per_class, 1)
    image_size = _check_int("image_size", image_size, 16, 512)
    seed = _check_int("seed", seed, 0)
    if num_classes > len(_GLYPHS):
        raise ValueError(
            f"num_classes={num_classes} is more than the {len(_GLYPHS)} characters of the demo "
            f"dataset; choose num_classes <= {len(_GLYPHS)}"
        )
    root = default_demo_root() if root is None else Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"root must be a folder, got the file {root}")
    params = {
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
        "version": _GENERATOR_VERSION,
    }
    csv_path = root / _CSV
    if not overwrite and _is_complete(root, params):
        return csv_path
    _font_dir()  # fail early with the install hint when matplotlib is missing

    root.mkdir(parents=True, exist_ok=True)
    with _folder_lock(root):
        if not overwrite and _is_complete(root, params):  # made by another process meanwhile
            return csv_path
        ours = (root / _MANIFEST).is_file() or (root / _IMAGES / _OWNER_MARK).is_file()
        foreign = [p.name for p in (root / _IMAGES, csv_path) if p.exists()]
        if foreign and not ours and not overwrite:
            raise FileExistsError(
                f"{root} already holds {' and '.join(foreign)} that the demo dataset did not "
                "write; choose another root or pass overwrite=True to replace them"
            )
        logger.info("Generating the demo dataset in %s", root)
        new_dir = Path(tempfile.mkdtemp(prefix=".demo-tmp-", dir=root))
        try:
            _generate(new_dir, params, progress)
            _install(root, new_dir)
        finally:
            shutil.rmtree(new_dir, ignore_errors=True)
    return csv_path
