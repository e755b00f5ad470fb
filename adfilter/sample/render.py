"""Ad images and clean images drawn with PIL on real photographs; a library the sample and the
traffic simulator share.

Ads come in six styles, so that no single cue (a coloured strip, big letters, a QR code) gives
them away:

- `banner`: a saturated strip (sometimes a diagonal ribbon) with a headline and a call to action;
- `sticker`: a price tag, starburst or round sticker ("SALE -50%", "$19.99", "18+"), rotated;
- `overlay`: outlined or shadowed lines straight on the photo, at an angle;
- `qr`: a QR code (a URL or a chat ID, decodable by `cv2.QRCodeDetector`) with a caption;
- `poster`: a coloured panel over part of the photo with headline, price and contact;
- `subtle`: one small, low-contrast contact line in a corner ("add V: ab1234"), the hard case.

Clean images are the photo alone (`plain`) or hard negatives that share the ads' surface cues
without advertising: ordinary captions ("Happy birthday Anna"), signs ("Kitchen, 3rd floor"),
camera timestamps, charts, saturated shapes, printed pages and QR-like chessboards.

Fonts are the TrueType files matplotlib ships (DejaVu and STIX families, regular to bold
italic); sizes, angles, colours and positions are drawn from the `rng` passed in, so one
generator state gives one image, byte for byte.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import qrcode
from PIL import Image, ImageDraw, ImageFont

from adfilter.sample.backgrounds import load_documents, load_patterns, random_view
from adfilter.sample.categories import ADULT, CATEGORIES, CONTACT, GAMBLING, LOAN, PRIZE, PROMOTION

AD_STYLES: Final = ("banner", "sticker", "overlay", "qr", "poster", "subtle")
PLAIN: Final = "plain"
HARD_NEGATIVE_KINDS: Final = (
    "caption",
    "sign",
    "timestamp",
    "chart",
    "shapes",
    "document",
    "pattern",
)
CLEAN_KINDS: Final = (PLAIN, *HARD_NEGATIVE_KINDS)

_REGULAR_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralItalic.ttf",
)
_BOLD_FONTS = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralBolIta.ttf",
)

RGBA = tuple[int, int, int, int]

# --------------------------------------------------------------------------- what ads say

_HEADLINES: Final[dict[str, tuple[str, ...]]] = {
    PROMOTION: (
        "SALE -{pct}%",
        "{pct}% OFF",
        "BUY 1 GET 1 FREE",
        "NEW COLLECTION",
        "MEGA SALE",
        "FLASH SALE",
        "Best price {price}",
        "ONLY {price}",
        "{price}",
        "Free shipping",
        "Limited offer",
        "Clearance -{pct}%",
        "Order now",
        "Code SAVE{pct}",
        "Factory direct",
        "Wholesale prices",
    ),
    CONTACT: (
        "add V: {handle}",
        "Add me on WeChat",
        "WeChat: {handle}",
        "QQ {qq}",
        "WhatsApp {phone}",
        "Telegram @{handle}",
        "DM me for prices",
        "wx: {handle}",
        "Part-time job, daily pay",
        "Line ID: {handle}",
        "VX {handle}",
        "Contact: {phone}",
    ),
    PRIZE: (
        "YOU WON!",
        "WINNER!",
        "CLAIM YOUR PRIZE",
        "You won {money}",
        "Free iPhone - claim now",
        "Lucky draw winner",
        "Claim code {code}",
        "Congratulations! {money}",
        "Gift card {money}",
    ),
    LOAN: (
        "FAST LOANS",
        "Loan up to {money}",
        "0% APR loans",
        "Cash in 5 minutes",
        "No credit check",
        "Instant approval",
        "Debt relief now",
        "Bad credit? No problem",
    ),
    GAMBLING: (
        "CASINO BONUS {pct}0%",
        "Free spins",
        "Bet now, win big",
        "Online slots",
        "Jackpot {money}",
        "Sports betting x10 odds",
        "Poker bonus {money}",
        "Live casino 24/7",
    ),
    ADULT: (
        "18+ ONLY",
        "Hot singles near you",
        "Adult chat 24/7",
        "XXX live cams",
        "Lonely tonight?",
        "Adult dating",
        "Meet girls tonight",
        "Private shows 18+",
    ),
}

_STICKERS: Final[dict[str, tuple[str, ...]]] = {
    PROMOTION: ("-{pct}%", "{price}", "SALE", "{pct}% OFF", "NEW", "HOT DEAL", "2 FOR 1"),
    CONTACT: ("add V", "WeChat", "DM me", "QQ", "wx"),
    PRIZE: ("WIN!", "{money}", "FREE", "PRIZE", "WINNER"),
    LOAN: ("0% APR", "LOANS", "{money}", "CASH"),
    GAMBLING: ("{pct}0% BONUS", "FREE SPINS", "BET", "JACKPOT", "777"),
    ADULT: ("18+", "XXX", "HOT", "LIVE"),
}

_CALLS: Final[dict[str, tuple[str, ...]]] = {
    PROMOTION: (
        "Visit {url}",
        "Shop at {url}",
        "Call {phone}",
        "Order: {chat}",
        "Only today!",
        "{url}",
    ),
    CONTACT: ("{chat}", "Add {chat}", "Call {phone}", "{chat} for details"),
    PRIZE: (
        "Call {phone} now",
        "Claim at {url}",
        "Text WIN to {short}",
        "{url}",
        "Valid 12 hrs only",
    ),
    LOAN: ("Call {phone}", "Apply at {url}", "{chat}", "Text LOAN to {short}"),
    GAMBLING: ("Play at {url}", "{url}", "Join: {chat}", "Text BET to {short}"),
    ADULT: ("Text HOT to {short}", "{url}", "{chat}", "Call {phone}"),
}

_QR_CAPTIONS: Final = (
    "Scan me",
    "Scan to win",
    "Scan for {pct}% off",
    "Scan to add WeChat",
    "Scan & claim",
    "Scan to join",
    "Scan to order",
)

# --------------------------------------------------------------------------- what clean images say

_CAPTIONS: Final = (
    "Happy birthday Anna",
    "Kitchen, 3rd floor",
    "Summer 2019",
    "Grandma's garden",
    "Our first trip",
    "Best friends forever",
    "Good morning!",
    "Day 3: Lisbon",
    "Merry Christmas",
    "Sunday hike",
    "Class of 2021",
    "Coffee break",
    "Welcome home",
    "Happy new year {year}",
    "Lake Como, {year}",
    "Family dinner",
    "First day of school",
    "Moving day",
    "Tom's 30th",
    "Rainy afternoon",
    "Meeting at {hour}:30",
    "Mum & Dad",
    "Look what I found",
    "View from room {room}",
)
_SIGNS: Final = (
    "EXIT",
    "Kitchen, 3rd floor",
    "Room {room}",
    "Platform {small}",
    "Staff only",
    "No parking",
    "Main Street",
    "Library",
    "Quiet please",
    "Toilets ->",
    "Parking P{small}",
    "Gate {small}",
    "Floor {small}",
    "Reception",
    "Push",
    "Pull",
    "Way out",
    "Town centre {small} km",
)
_CHART_TITLES: Final = (
    "Rainfall (mm)",
    "Temperature",
    "Steps per day",
    "Q{small} results",
    "Reading log",
    "Monthly budget",
    "Visitors {year}",
    "Sleep hours",
    "Plant growth (cm)",
)


# --------------------------------------------------------------------------- small helpers


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _values(rng: np.random.Generator) -> dict[str, str]:
    """Random fill-ins for the templates above: prices, phone numbers, handles, URLs."""
    currency = _pick(rng, ("$", "€", "£", "¥", "USD "))
    amount = _pick(rng, ("{a}.99", "{a}", "{a},{t}99", "{a}.50"))
    price = currency + amount.format(a=int(rng.integers(2, 999)), t=int(rng.integers(1, 9)))
    money = (
        _pick(rng, ("$", "£", "€")) + f"{int(rng.choice([500, 1000, 2000, 5000, 10000, 50000])):,}"
    )
    letters = "abcdefghjkmnpqrstuvwxyz"
    stem = "".join(_pick(rng, letters) for _ in range(int(rng.integers(2, 6))))
    handle = _pick(
        rng,
        (
            stem + str(int(rng.integers(100, 99999))),
            stem + "_" + _pick(rng, ("shop", "vip", "deals", "bot", "love", "888")),
            _pick(rng, ("vip", "sale", "win", "hot")) + stem + str(int(rng.integers(1, 999))),
        ),
    )

    def digits(n: int) -> str:
        return "".join(str(int(d)) for d in rng.integers(0, 10, n))

    phone = _pick(
        rng,
        (
            f"+1 {digits(3)}-{digits(3)}-{digits(4)}",
            f"0800 {digits(3)} {digits(4)}",
            f"1{int(rng.integers(30, 90))} {digits(4)} {digits(4)}",
            f"+44 7{digits(3)} {digits(6)}",
            f"0906{digits(1)} {digits(6)}",
            f"+86 1{digits(2)} {digits(4)} {digits(4)}",
        ),
    )
    word = _pick(
        rng, ("best", "win", "cheap", "vip", "lucky", "top", "mega", "hot", "easy", "cash", "bet")
    )
    tld = _pick(rng, (".shop", ".top", ".xyz", ".com", ".net", ".vip", ".club", ".co.uk", ".biz"))
    url = _pick(
        rng,
        (
            f"www.{word}-{stem}{tld}",
            f"{word}{stem}{tld}",
            f"bit.ly/{stem}{digits(2)}",
            f"{word}{tld}/{stem}",
            f"t.me/{handle}",
        ),
    )
    chat = _pick(
        rng,
        (
            f"add V: {handle}",
            f"WeChat: {handle}",
            f"QQ {digits(int(rng.integers(6, 11)))}",
            f"WhatsApp {phone}",
            f"Telegram @{handle}",
            f"wx: {handle}",
            f"VX: {handle}",
        ),
    )
    return {
        "price": price,
        "pct": str(int(rng.integers(1, 10)) * 10 - int(rng.choice([0, 5]))),
        "money": money,
        "handle": handle,
        "qq": digits(int(rng.integers(6, 11))),
        "phone": phone,
        "url": url,
        "chat": chat,
        "code": "".join(_pick(rng, "ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(5)),
        "short": str(int(rng.integers(60000, 89999))),
        "year": str(int(rng.integers(1995, 2026))),
        "hour": str(int(rng.integers(7, 21))),
        "room": str(int(rng.integers(101, 520))),
        "small": str(int(rng.integers(1, 10))),
    }


def _say(rng: np.random.Generator, templates: Sequence[str], values: Mapping[str, str]) -> str:
    return _pick(rng, templates).format(**values)


@functools.cache
def _font_dir() -> Path:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    missing = [n for n in (*_REGULAR_FONTS, *_BOLD_FONTS) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: fonts {', '.join(missing)} missing from matplotlib; reinstall matplotlib"
        )
    return folder


@functools.lru_cache(maxsize=1024)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / name), max(6, size))


def _fit(
    text: str, name: str, size: int, max_w: float, max_h: float, stroke: int = 0
) -> ImageFont.FreeTypeFont:
    """The font `name` at `size` or smaller, so that `text` fits in max_w x max_h."""
    while True:
        font = _font(name, size)
        left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
        if (right - left <= max_w and bottom - top <= max_h) or size <= 6:
            return font
        size = max(
            6, int(size * min(0.92, max_w / max(1, right - left), max_h / max(1, bottom - top)))
        )


def _saturated(rng: np.random.Generator, alpha: int = 255) -> RGBA:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    return int(r * 255), int(g * 255), int(b * 255), alpha


def _muted(rng: np.random.Generator, alpha: int = 255) -> RGBA:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.1, 0.95))
    return int(r * 255), int(g * 255), int(b * 255), alpha


def _ink_on(fill: Sequence[int], rng: np.random.Generator) -> RGBA:
    """A text colour that stands out on `fill`."""
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    if luminance > 140:
        return _pick(rng, ((0, 0, 0, 255), (20, 20, 90, 255), (120, 0, 0, 255)))
    return _pick(rng, ((255, 255, 255, 255), (255, 235, 0, 255), (255, 255, 200, 255)))


def _text_layer(
    text: str,
    font: ImageFont.FreeTypeFont,
    fill: RGBA,
    stroke: int = 0,
    stroke_fill: RGBA | None = None,
    shadow: RGBA | None = None,
) -> Image.Image:
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    pad = 2 + stroke + (2 if shadow else 0)
    layer = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    origin = (pad - left, pad - top)
    if shadow is not None:
        draw.text((origin[0] + 2, origin[1] + 2), text, font=font, fill=shadow)
    draw.text(origin, text, font=font, fill=fill, stroke_width=stroke, stroke_fill=stroke_fill)
    return layer


def _rotate(layer: Image.Image, angle: float) -> Image.Image:
    if abs(angle) < 0.5:
        return layer
    return layer.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)


def _composite(base: Image.Image, layer: Image.Image, x: float, y: float) -> None:
    """Paste `layer` with its top-left near (x, y), moved (and shrunk) to stay inside `base`."""
    bw, bh = base.size
    if layer.width > bw or layer.height > bh:
        ratio = min(bw / layer.width, bh / layer.height)
        layer = layer.resize((max(1, int(layer.width * ratio)), max(1, int(layer.height * ratio))))
    x = int(min(max(0, x), bw - layer.width))
    y = int(min(max(0, y), bh - layer.height))
    base.alpha_composite(layer, (x, y))


def _random_spot(
    rng: np.random.Generator, base: Image.Image, layer: Image.Image
) -> tuple[float, float]:
    return (
        rng.uniform(0, max(0, base.width - layer.width)),
        rng.uniform(0, max(0, base.height - layer.height)),
    )


def _lines_layer(
    rng: np.random.Generator,
    lines: Sequence[str],
    width: float,
    height: float,
    fill: RGBA,
    bold: bool = True,
    stroke_fill: RGBA | None = None,
) -> Image.Image:
    """Lines stacked and centred in one transparent layer, the first one biggest."""
    name = _pick(rng, _BOLD_FONTS if bold else _REGULAR_FONTS)
    weights = [1.6] + [1.0] * (len(lines) - 1)
    rows = []
    for text, w in zip(lines, weights, strict=True):
        max_h = height * w / sum(weights) * 0.85
        stroke = max(1, int(max_h / 14)) if stroke_fill else 0
        font = _fit(text, name, int(max_h), width, max_h, stroke)
        rows.append(_text_layer(text, font, fill, stroke, stroke_fill))
    gap = 2
    total_h = sum(r.height for r in rows) + gap * (len(rows) - 1)
    layer = Image.new("RGBA", (max(r.width for r in rows), total_h), (0, 0, 0, 0))
    y = 0
    for row in rows:
        layer.alpha_composite(row, ((layer.width - row.width) // 2, y))
        y += row.height + gap
    return layer


# --------------------------------------------------------------------------- QR codes


def qr_payload(rng: np.random.Generator, category: str) -> str:
    """What an ad's QR code encodes: a short URL or a chat ID."""
    v = _values(rng)
    if category == CONTACT or rng.random() < 0.3:
        return _pick(
            rng, (f"weixin://{v['handle']}", f"https://t.me/{v['handle']}", f"WeChat:{v['handle']}")
        )
    return "https://" + v["url"].removeprefix("www.")


def qr_image(
    data: str,
    module_px: int,
    dark: Sequence[int] = (0, 0, 0),
    light: Sequence[int] = (255, 255, 255),
) -> Image.Image:
    """A QR code for `data` with a 4-module quiet zone, `module_px` pixels per module, RGBA."""
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, box_size=1, border=4)
    code.add_data(data)
    code.make(fit=True)
    matrix = np.asarray(code.get_matrix(), dtype=bool)
    rgb = np.where(
        matrix[..., None], np.asarray(dark[:3], np.uint8), np.asarray(light[:3], np.uint8)
    )
    rgb = np.repeat(np.repeat(rgb, module_px, axis=0), module_px, axis=1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert("RGBA")


# --------------------------------------------------------------------------- ad styles


def _banner(rng: np.random.Generator, img: Image.Image, category: str, v: dict[str, str]) -> None:
    size = img.width
    strip_h = int(img.height * rng.uniform(0.18, 0.32))
    fill = _saturated(rng, int(rng.integers(190, 256)))
    strip = Image.new("RGBA", (size, strip_h), fill)
    lines = [_say(rng, _HEADLINES[category], v)]
    if rng.random() < 0.65:
        lines.append(_say(rng, _CALLS[category], v))
    text = _lines_layer(rng, lines, size * 0.92, strip_h * 0.9, _ink_on(fill, rng))
    strip.alpha_composite(text, ((size - text.width) // 2, max(0, (strip_h - text.height) // 2)))
    if rng.random() < 0.2:
        ribbon = _rotate(strip, _pick(rng, (1, -1)) * rng.uniform(20, 40))
        _composite(img, ribbon, *_random_spot(rng, img, ribbon))
        return
    y = _pick(rng, (0, img.height - strip_h, rng.uniform(0, img.height - strip_h)))
    _composite(img, strip, 0, y)


def _sticker(rng: np.random.Generator, img: Image.Image, category: str, v: dict[str, str]) -> None:
    d = int(img.width * rng.uniform(0.32, 0.5))
    layer = Image.new("RGBA", (d, d), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    fill = _pick(rng, ((230, 20, 30, 255), (255, 210, 0, 255), (255, 120, 0, 255), _saturated(rng)))
    shape = _pick(rng, ("burst", "circle", "tag"))
    if shape == "burst":
        spikes = int(rng.integers(10, 20))
        points = []
        for i in range(2 * spikes):
            r = d / 2 * (1.0 if i % 2 == 0 else rng.uniform(0.72, 0.85))
            t = math.pi * i / spikes
            points.append((d / 2 + r * math.cos(t), d / 2 + r * math.sin(t)))
        draw.polygon(points, fill=fill)
        box = (d * 0.62, d * 0.42)
    elif shape == "circle":
        draw.ellipse(
            (1, 1, d - 2, d - 2), fill=fill, outline=(255, 255, 255, 255), width=max(1, d // 30)
        )
        box = (d * 0.68, d * 0.45)
    else:
        top = d * 0.25
        draw.rounded_rectangle((1, top, d - 2, d - top), radius=d // 10, fill=fill)
        draw.ellipse((d * 0.06, d * 0.46, d * 0.12, d * 0.54), fill=(255, 255, 255, 255))
        box = (d * 0.72, (d - 2 * top) * 0.8)
    lines = [_say(rng, _STICKERS[category], v)]
    if rng.random() < 0.3:
        lines.append(_say(rng, _STICKERS[category], v))
    text = _lines_layer(rng, lines, *box, _ink_on(fill, rng))
    layer.alpha_composite(text, ((d - text.width) // 2, (d - text.height) // 2))
    layer = _rotate(layer, rng.uniform(-30, 30))
    _composite(img, layer, *_random_spot(rng, img, layer))
    if rng.random() < 0.5:
        _overlay_line(rng, img, _say(rng, _CALLS[category], v), rng.uniform(0.05, 0.08))


def _overlay_line(
    rng: np.random.Generator, img: Image.Image, text: str, rel_size: float, y: float | None = None
) -> None:
    size = int(img.width * rel_size)
    fill = _pick(
        rng, ((255, 255, 255, 255), (255, 235, 0, 255), (255, 40, 40, 255), _saturated(rng))
    )
    font = _fit(
        text, _pick(rng, _BOLD_FONTS + _REGULAR_FONTS), size, img.width * 0.95, img.height * 0.3
    )
    if rng.random() < 0.6:
        layer = _text_layer(text, font, fill, stroke=max(1, size // 12), stroke_fill=(0, 0, 0, 255))
    else:
        layer = _text_layer(text, font, fill, shadow=(0, 0, 0, 200))
    layer = _rotate(layer, rng.uniform(-12, 12) if rng.random() < 0.5 else 0.0)
    x, y0 = _random_spot(rng, img, layer)
    _composite(img, layer, x, y0 if y is None else y)


def _overlay(rng: np.random.Generator, img: Image.Image, category: str, v: dict[str, str]) -> None:
    lines = [_say(rng, _HEADLINES[category], v)]
    if rng.random() < 0.75:
        lines.append(_say(rng, _CALLS[category], v))
    band = img.height / len(lines)
    for i, text in enumerate(lines):
        rel = rng.uniform(0.08, 0.14) if i == 0 else rng.uniform(0.055, 0.09)
        _overlay_line(rng, img, text, rel, y=band * i + rng.uniform(0, band * 0.5))


def _qr(rng: np.random.Generator, img: Image.Image, category: str, v: dict[str, str]) -> None:
    data = qr_payload(rng, category)
    modules = qr_image(data, 1).width  # the code's size is known only once qrcode lays it out
    target = img.width * rng.uniform(0.4, 0.58)
    module_px = max(2, int(target / modules))
    dark = _pick(rng, ((0, 0, 0), (10, 10, 60), (60, 0, 0), (0, 50, 0)))
    code = qr_image(data, module_px, dark)
    caption = _say(rng, _QR_CAPTIONS, v)
    font = _fit(
        caption, _pick(rng, _BOLD_FONTS), int(img.width * 0.07), code.width * 1.2, img.height * 0.1
    )
    label = _text_layer(caption, font, (0, 0, 0, 255))
    card = Image.new(
        "RGBA",
        (max(code.width, label.width) + 4, code.height + label.height + 2),
        (255, 255, 255, 255),
    )
    card.alpha_composite(code, ((card.width - code.width) // 2, 0))
    card.alpha_composite(label, ((card.width - label.width) // 2, code.height))
    if rng.random() < 0.2:
        card = _rotate(card, rng.uniform(-8, 8))
    if rng.random() < 0.5:
        _overlay_line(rng, img, _say(rng, _HEADLINES[category], v), rng.uniform(0.07, 0.11))
    _composite(img, card, *_random_spot(rng, img, card))


def _poster(rng: np.random.Generator, img: Image.Image, category: str, v: dict[str, str]) -> None:
    w, h = img.size
    side = _pick(rng, ("left", "right", "top", "bottom", "full"))
    frac = rng.uniform(0.45, 0.7)
    box = {
        "left": (0, 0, w * frac, h),
        "right": (w * (1 - frac), 0, w, h),
        "top": (0, 0, w, h * frac),
        "bottom": (0, h * (1 - frac), w, h),
        "full": (0, 0, w, h),
    }[side]
    x0, y0, x1, y1 = (int(c) for c in box)
    top, bottom = (
        _saturated(rng, int(rng.integers(200, 256))),
        _saturated(rng, int(rng.integers(200, 256))),
    )
    ramp = np.linspace(0.0, 1.0, y1 - y0)[:, None, None]
    panel = (np.asarray(top) * (1 - ramp) + np.asarray(bottom) * ramp).repeat(x1 - x0, axis=1)
    panel_img = Image.fromarray(panel.astype(np.uint8), "RGBA")
    if side == "full":
        # The photo survives as an inset, as in a flyer.
        inset = img.convert("RGB").resize((w // 2, h // 2)).convert("RGBA")
        panel_img.alpha_composite(
            inset, (int(rng.uniform(0, w // 2)), int(rng.uniform(h * 0.35, h // 2)))
        )
    img.alpha_composite(panel_img, (x0, y0))
    lines = [_say(rng, _HEADLINES[category], v)]
    if category == PROMOTION or rng.random() < 0.4:
        lines.append(_say(rng, _STICKERS[category], v))
    lines.append(_say(rng, _CALLS[category], v))
    area_h = (y1 - y0) * (0.35 if side == "full" else 0.85)
    text = _lines_layer(
        rng, lines, (x1 - x0) * 0.9, area_h, _ink_on(top, rng), bold=rng.random() < 0.8
    )
    _composite(img, text, x0 + (x1 - x0 - text.width) / 2, y0 + rng.uniform(0.02, 0.1) * (y1 - y0))


def _subtle(rng: np.random.Generator, img: Image.Image, category: str, v: dict[str, str]) -> None:
    text = (
        v["chat"] if category == CONTACT or rng.random() < 0.5 else _say(rng, _CALLS[category], v)
    )
    size = int(img.width * rng.uniform(0.05, 0.075))
    font = _fit(
        text, _pick(rng, _REGULAR_FONTS + _BOLD_FONTS), size, img.width * 0.9, img.height * 0.2
    )
    probe = _text_layer(text, font, (0, 0, 0, 255))
    corner_x = _pick(rng, (rng.uniform(0, 0.08), rng.uniform(0.5, 1.0))) * (img.width - probe.width)
    corner_y = _pick(rng, (rng.uniform(0, 0.08), rng.uniform(0.85, 1.0))) * (
        img.height - probe.height
    )
    x, y = max(0.0, corner_x), max(0.0, corner_y)
    region = img.convert("RGB").crop((int(x), int(y), int(x) + probe.width, int(y) + probe.height))
    mean = np.asarray(region, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    # Low contrast on purpose: a little lighter or darker than what lies under it.
    delta = rng.uniform(45, 90) * (1 if mean.mean() < 128 else -1)
    ink = tuple(int(np.clip(c + delta, 0, 255)) for c in mean) + (int(rng.integers(170, 256)),)
    layer = _rotate(_text_layer(text, font, ink), rng.uniform(-6, 6) if rng.random() < 0.3 else 0.0)
    _composite(img, layer, x, y)


_AD_RENDERERS = {
    "banner": _banner,
    "sticker": _sticker,
    "overlay": _overlay,
    "qr": _qr,
    "poster": _poster,
    "subtle": _subtle,
}


def render_ad_image(
    rng: np.random.Generator, background: Image.Image, category: str, style: str
) -> Image.Image:
    """`background` with an ad of `category` (see `categories.CATEGORIES`) drawn in `style`
    (one of `AD_STYLES`); returns a new RGB image of the same size."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown ad category {category!r}; known: {', '.join(CATEGORIES)}")
    if style not in _AD_RENDERERS:
        raise ValueError(f"unknown ad style {style!r}; known: {', '.join(AD_STYLES)}")
    img = background.convert("RGBA")
    _AD_RENDERERS[style](rng, img, category, _values(rng))
    return img.convert("RGB")


# --------------------------------------------------------------------------- clean kinds


def _caption(rng: np.random.Generator, img: Image.Image, v: dict[str, str]) -> None:
    text = _say(rng, _CAPTIONS, v)
    if rng.random() < 0.35:
        # A coloured strip like an ad banner, saying nothing commercial.
        strip_h = int(img.height * rng.uniform(0.12, 0.22))
        fill = (_saturated if rng.random() < 0.5 else _muted)(rng, int(rng.integers(150, 256)))
        strip = Image.new("RGBA", (img.width, strip_h), fill)
        line = _lines_layer(
            rng, [text], img.width * 0.9, strip_h * 0.8, _ink_on(fill, rng), bold=rng.random() < 0.5
        )
        strip.alpha_composite(
            line, ((img.width - line.width) // 2, max(0, (strip_h - line.height) // 2))
        )
        _composite(img, strip, 0, _pick(rng, (0, img.height - strip_h)))
    else:
        _overlay_line(rng, img, text, rng.uniform(0.06, 0.12))


def _sign(rng: np.random.Generator, img: Image.Image, v: dict[str, str]) -> None:
    text = _say(rng, _SIGNS, v)
    fill, ink = _pick(
        rng,
        (
            ((0, 120, 60, 255), (255, 255, 255, 255)),
            ((20, 60, 160, 255), (255, 255, 255, 255)),
            ((245, 245, 240, 255), (20, 20, 20, 255)),
            ((120, 70, 30, 255), (255, 255, 230, 255)),
            ((250, 200, 0, 255), (0, 0, 0, 255)),
        ),
    )
    font = _fit(
        text,
        _pick(rng, _BOLD_FONTS[:2] + _REGULAR_FONTS[:1]),
        int(img.width * rng.uniform(0.07, 0.12)),
        img.width * 0.8,
        img.height * 0.2,
    )
    label = _text_layer(text, font, ink)
    pad = max(3, label.height // 3)
    sign = Image.new("RGBA", (label.width + 2 * pad, label.height + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(sign).rounded_rectangle(
        (0, 0, sign.width - 1, sign.height - 1),
        radius=pad,
        fill=fill,
        outline=ink,
        width=max(1, pad // 3),
    )
    sign.alpha_composite(label, (pad, pad))
    sign = _rotate(sign, rng.uniform(-10, 10))
    _composite(img, sign, *_random_spot(rng, img, sign))


def _timestamp(rng: np.random.Generator, img: Image.Image, v: dict[str, str]) -> None:
    day, month = int(rng.integers(1, 29)), int(rng.integers(1, 13))
    hour, minute = int(rng.integers(0, 24)), int(rng.integers(0, 60))
    text = _pick(
        rng,
        (
            f"{v['year']}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}",
            f"{day:02d}/{month:02d}/{v['year']}",
            f"{month:02d} {day:02d} '{v['year'][2:]}",
        ),
    )
    font = _font(
        _pick(rng, ("DejaVuSansMono-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")),
        int(img.width * rng.uniform(0.05, 0.08)),
    )
    layer = _text_layer(
        text, font, _pick(rng, ((255, 150, 0, 255), (255, 220, 60, 255), (255, 90, 20, 255)))
    )
    x = img.width - layer.width - rng.uniform(1, 2 + img.width * 0.05)
    y = img.height - layer.height - rng.uniform(1, 2 + img.height * 0.05)
    _composite(img, layer, x, y)


def _chart(rng: np.random.Generator, img: Image.Image, v: dict[str, str]) -> None:
    w = int(img.width * rng.uniform(0.55, 0.9))
    h = int(img.height * rng.uniform(0.45, 0.8))
    panel = Image.new(
        "RGBA", (w, h), _pick(rng, ((255, 255, 255, 240), (245, 245, 235, 255), (30, 30, 40, 230)))
    )
    dark = panel.getpixel((0, 0))[0] < 128
    ink = (230, 230, 230, 255) if dark else (30, 30, 30, 255)
    draw = ImageDraw.Draw(panel)
    font = _font(_pick(rng, _REGULAR_FONTS[:2]), max(7, h // 14))
    title = _say(rng, _CHART_TITLES, v)
    draw.text((4, 2), title, font=font, fill=ink)
    left, bottom, top = w * 0.14, h * 0.86, h * 0.2
    draw.line((left, top, left, bottom), fill=ink, width=1)
    draw.line((left, bottom, w - 4, bottom), fill=ink, width=1)
    n = int(rng.integers(4, 9))
    values = rng.uniform(0.15, 1.0, n)
    top_value = int(rng.choice([10, 50, 100, 500, 1000]))
    for k in range(3):
        y = bottom - (bottom - top) * (k + 1) / 3
        draw.text((2, y - font.size / 2), str(top_value * (k + 1) // 3), font=font, fill=ink)
    kind = _pick(rng, ("bars", "line", "pie"))
    step = (w - 8 - left) / n
    if kind == "pie":
        draw.rectangle((left + 1, top, w - 4, bottom - 1), fill=panel.getpixel((0, 0)))
        r = min(w - left, bottom - top) / 2 * 0.9
        cx, cy = left + (w - left) / 2, top + (bottom - top) / 2
        start = 0.0
        for value in values:
            end = start + 360 * value / values.sum()
            draw.pieslice((cx - r, cy - r, cx + r, cy + r), start, end, fill=_saturated(rng))
            start = end
    elif kind == "bars":
        colour = _saturated(rng)
        for i, value in enumerate(values):
            x0 = left + 2 + i * step
            draw.rectangle(
                (x0, bottom - (bottom - top) * value, x0 + step * 0.7, bottom - 1), fill=colour
            )
    else:
        points = [
            (left + 2 + (i + 0.5) * step, bottom - (bottom - top) * value)
            for i, value in enumerate(values)
        ]
        draw.line(points, fill=_saturated(rng), width=2)
    _composite(img, panel, *_random_spot(rng, img, panel))


def _shapes(rng: np.random.Generator, img: Image.Image, v: dict[str, str]) -> None:
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    w, h = img.size
    for _ in range(int(rng.integers(2, 7))):
        colour = _saturated(rng, int(rng.integers(140, 256)))
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        x1, y1 = x0 + rng.uniform(w * 0.1, w * 0.45), y0 + rng.uniform(h * 0.1, h * 0.45)
        kind = _pick(rng, ("rect", "ellipse", "polygon", "strip"))
        if kind == "rect":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == "polygon":
            draw.polygon(
                [
                    (rng.uniform(x0, x1), rng.uniform(y0, y1))
                    for _ in range(int(rng.integers(3, 7)))
                ],
                fill=colour,
            )
        else:
            strip_h = h * rng.uniform(0.08, 0.2)
            draw.rectangle((0, y0, w, y0 + strip_h), fill=colour)
    img.alpha_composite(layer)


def _document(rng: np.random.Generator, img: Image.Image, v: dict[str, str]) -> None:
    docs = load_documents()
    page = docs[_pick(rng, list(docs))]
    if rng.random() < 0.4:
        view = random_view(rng, page, img.size, min_scale=0.4, max_angle=8)
        img.paste(view.convert("RGBA"))
        return
    w = int(img.width * rng.uniform(0.45, 0.8))
    h = int(w * rng.uniform(0.6, 1.2))
    view = random_view(rng, page, (w, min(h, img.height)), min_scale=0.4, max_angle=5).convert(
        "RGBA"
    )
    view = _rotate(view, rng.uniform(-15, 15))
    _composite(img, view, *_random_spot(rng, img, view))


def _pattern(rng: np.random.Generator, img: Image.Image, v: dict[str, str]) -> None:
    w = int(img.width * rng.uniform(0.3, 0.6))
    if rng.random() < 0.5:
        board = load_patterns()["chessboard_RGB"]
        patch = random_view(rng, board, (w, w), min_scale=0.3, max_angle=10).convert("RGBA")
    else:
        cells = int(rng.integers(5, 15))
        grid = rng.random((cells, cells)) < 0.5
        dark, light = _pick(
            rng,
            (
                ((0, 0, 0), (255, 255, 255)),
                ((20, 20, 80), (240, 240, 200)),
                (_saturated(rng)[:3], (255, 255, 255)),
            ),
        )
        rgb = np.where(grid[..., None], np.asarray(dark, np.uint8), np.asarray(light, np.uint8))
        patch = (
            Image.fromarray(rgb.astype(np.uint8), "RGB")
            .resize((w, w), Image.Resampling.NEAREST)
            .convert("RGBA")
        )
    patch = _rotate(patch, rng.uniform(-20, 20) if rng.random() < 0.5 else 0.0)
    _composite(img, patch, *_random_spot(rng, img, patch))


_CLEAN_RENDERERS = {
    "caption": _caption,
    "sign": _sign,
    "timestamp": _timestamp,
    "chart": _chart,
    "shapes": _shapes,
    "document": _document,
    "pattern": _pattern,
}


def render_clean_image(
    rng: np.random.Generator, background: Image.Image, hard_negative: bool, kind: str | None = None
) -> Image.Image:
    """A clean (non-ad) image on `background`: the photo alone, or with `hard_negative` one of
    `HARD_NEGATIVE_KINDS` (`kind`, or a random one). Returns a new RGB image."""
    if not hard_negative:
        return background.convert("RGB").copy()
    if kind is None:
        kind = _pick(rng, HARD_NEGATIVE_KINDS)
    if kind not in _CLEAN_RENDERERS:
        raise ValueError(
            f"unknown hard-negative kind {kind!r}; known: {', '.join(HARD_NEGATIVE_KINDS)}"
        )
    img = background.convert("RGBA")
    _CLEAN_RENDERERS[kind](rng, img, _values(rng))
    return img.convert("RGB")
