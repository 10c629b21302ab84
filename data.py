"""Data for mtv: the toy world, shard reading and writing, label-consistent views, collation.

The toy world is a tiny procedural 3-D world (coloured cubes, spheres, cylinders and cones on a
textured floor before a brick wall, seen by a camera of random height, pitch and roll) rendered by
analytic ray casting in numpy. Every scene comes with the truth that real data lacks: metric depth
per pixel, instance masks, boxes with entity names and probe labels. Its caption is web alt-text
by default (some objects, often without or with wrong attributes) or, with --captions full, names
every object and some relations. That makes each of the four MTV objectives, and every
evaluation, runnable and checkable on a CPU.

The world is built so that the paper's question has an answer at the ladder's 32 px with 8-px
patches (tests/test_world.py checks each): nearly every object covers a patch, its shape can be
read from the 2x2 patches around it, the patch position explains only about half of the depth,
and the captions leave out what the image shows.

Shards are POSIX tars in webdataset layout (members grouped by key: KEY.png, KEY.txt, ...), read
with the standard library's tarfile; img2dataset output (KEY.jpg + KEY.txt + KEY.json) is valid
input as is. `ShardDataset` streams them, split over ranks and dataloader workers, and applies
`make_views`: random resized crops and flips that move depth maps and boxes with the image.

    python data.py --out data/toy --n 2000 --val-n 500     # write train/val shards (web captions)
    python data.py --out data/toy-full --n 2000 --captions full
    python data.py --preview data/toy/train-000000.tar --png preview.png
"""

import argparse
import glob
import io
import json
import math
import os
import re
import sys
import tarfile
import textwrap
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# The toy world: vocabulary, camera, primitives

SHAPES = ("cube", "sphere", "cylinder", "cone")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES = ("small", "large")

RGB = np.array([(0.85, 0.13, 0.10), (0.95, 0.50, 0.08), (0.95, 0.85, 0.15), (0.20, 0.68, 0.22),
                (0.15, 0.75, 0.80), (0.15, 0.30, 0.88), (0.55, 0.22, 0.75), (0.92, 0.92, 0.90)])
# World units; the camera stands 1.2-2.2 high. Objects are large and near (1.8-4.2 units away) so
# that at 32 px with 8-px patches nearly every object covers a patch or more: a ViT can only learn
# the shape of what its patch grid can see.
RADIUS = {"small": 0.65, "large": 1.05}
FLOORS = {                                         # two checker tones each, desaturated: no floor
    "grey tiled": ((0.55, 0.55, 0.56), (0.40, 0.40, 0.42)),  # passes for an object colour
    "sandy": ((0.72, 0.64, 0.50), (0.60, 0.52, 0.40)),
    "brown wooden": ((0.50, 0.38, 0.28), (0.40, 0.30, 0.22)),
    "slate": ((0.42, 0.46, 0.50), (0.32, 0.35, 0.39)),
}
WALLS = (((0.78, 0.75, 0.70), (0.66, 0.63, 0.58)),  # brick courses in two tones, as desaturated
         ((0.62, 0.60, 0.66), (0.52, 0.50, 0.56)),  # as the floors
         ((0.58, 0.50, 0.46), (0.48, 0.41, 0.37)))
# Bumped whenever render_scene draws different scenes: the readable part of the toy data's cache name
# (runs/toy-data/; the digest of data.py and pseudolabel.py after it is what keeps it from going stale).
WORLD = "world2"
FOV = math.radians(50.0)                           # square images: same field of view both ways
FOCAL = 0.5 / math.tan(FOV / 2)                    # focal length in units of the image width
MAX_HIDDEN = 0.35                                  # most of a farther object's disc a nearer one may hide
# The shape-only world (render_scene(world="shapes")): a positive control for self-distillation.
# One object in one colour before a fixed floor, wall, light and camera: scenes differ by the
# object's shape, size, place and turn only, so nothing shared by all views (colour, background)
# can crowd shape out of the features (feature suppression, Chen, Luo & Li 2021).
SHAPES_WORLD = "shapes1"
WORLDS = {"toy": WORLD, "shapes": SHAPES_WORLD}  # --world -> the readable part of the cache name
SHAPES_CAMERA = {"height": 1.7, "pitch": math.radians(17), "roll": 0.0, "fov": FOV, "wall": 9.0, "wall_height": 4.0}
SHAPES_ROOM = {"floor": "grey tiled", "wall_tone": 0, "cell": 0.75, "angle": 0.3, "shift": np.array([0.5, 0.5])}
SHAPES_COLOR = "white"
HORIZON, ZENITH = np.array([0.80, 0.86, 0.92], np.float32), np.array([0.35, 0.55, 0.85], np.float32)


def sample_camera(rng):
    """Camera and room of one scene. A fixed camera would make depth a function of the image row
    (a probe on patch position alone explained 94 % of the patch depth in a world without roll
    and wall), so the camera's height, pitch and roll vary widely and a back wall stands at a
    random distance, cutting the floor off: where a pixel is says much less about how far it is."""
    height = rng.uniform(1.2, 2.2)
    pitch = rng.uniform(math.radians(4), min(math.radians(30), math.atan(height / 2.8)))  # objects fit
    nearest = height / math.tan(pitch + FOV / 2)               # the nearest floor point in view
    return {"height": height, "pitch": pitch, "roll": math.radians(rng.uniform(-15, 15)), "fov": FOV,
            "wall": max(rng.uniform(4.0, 12.0), nearest + 2.0),  # room for an object in front of it
            "wall_height": rng.uniform(2.5, 6.0)}


@lru_cache(maxsize=64)  # a scene's layout asks for its camera's rotation hundreds of times
def rotation(pitch, roll):
    """(3, 3) camera-to-world rotation: roll about the viewing axis, then pitch down (read-only:
    callers share the cached array)."""
    cr, sr, cp, sp = math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch)
    R_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    R_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    R = (R_pitch @ R_roll).astype(np.float32)
    R.flags.writeable = False
    return R


@lru_cache(maxsize=8)
def camera_rays(size):
    """Per-pixel ray directions in the camera frame, scaled so that z = 1: (3, size*size).

    With z = 1 the ray parameter t of a hit *is* its metric depth (camera z), no division needed.
    float32 throughout the renderer: twice as fast as float64 on these small arrays.
    """
    c = ((np.arange(size) + 0.5) / size - 0.5) / FOCAL        # pixel centres, v grows downwards
    u, v = np.meshgrid(c, c)                                   # (S, S) each
    return np.stack([u.ravel(), -v.ravel(), np.ones(size * size)]).astype(np.float32)


def world_rays(size, cam):
    """The camera rays rotated into world axes (x right, y up, z ahead): (3, N). A rotation keeps
    the rays' camera z, so t along them is still depth."""
    return rotation(cam["pitch"], cam["roll"]) @ camera_rays(size)


def project(point, cam):
    """World point -> (x, y) in 0..1 image coordinates and its depth (camera z)."""
    q = rotation(cam["pitch"], cam["roll"]).T @ (np.asarray(point, np.float32) - [0, cam["height"], 0])
    return 0.5 + FOCAL * float(q[0] / q[2]), 0.5 - FOCAL * float(q[1] / q[2]), float(q[2])


# Ray-primitive intersections. Every object stands on the floor (y = 0) around its vertical axis.
# hit_*(ob, o, d) take ray origins o and directions d, (3, N) or (3, 1) (broadcast), and return
# the nearest t > 0 (N,), inf on a miss. Directions are not unit length, so quadratics keep `a`.

def _roots(a, b, c):
    """Both roots of a t^2 + 2 b t + c = 0 (nan where there are none)."""
    disc = np.sqrt(b * b - a * c)
    return (-b - disc) / a, (-b + disc) / a


def hit_sphere(ob, o, d):
    oc = o - np.array(ob["center"], np.float32)[:, None]
    t, _ = _roots((d * d).sum(0), (oc * d).sum(0), (oc * oc).sum(0) - ob["a"] ** 2)
    return np.where(t > 1e-4, t, np.inf)                       # the camera is never inside


def _yaw(v, angle):
    """Rotate vectors (3, N) about the vertical axis; by a cube's yaw, into its axis-aligned frame."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]], np.float32) @ v


def hit_cube(ob, o, d):
    o, d = _yaw(o - np.array(ob["center"], np.float32)[:, None], ob["yaw"]), _yaw(d, ob["yaw"])
    t1, t2 = (-ob["a"] - o) / d, (ob["a"] - o) / d            # slab test: (3, N) per-axis crossings
    near, far = np.minimum(t1, t2).max(0), np.maximum(t1, t2).min(0)
    return np.where((near <= far) & (near > 1e-4), near, np.inf)


def hit_cylinder(ob, o, d):
    ox, oy, oz = o[0] - ob["center"][0], o[1], o[2] - ob["center"][2]
    t, _ = _roots(d[0] ** 2 + d[2] ** 2, ox * d[0] + oz * d[2], ox ** 2 + oz ** 2 - ob["a"] ** 2)
    y = oy + t * d[1]
    side = np.where((t > 1e-4) & (y >= 0) & (y <= ob["h"]), t, np.inf)
    tc = (ob["h"] - oy) / d[1]                                 # the top cap (the bottom is on the floor)
    inside = (ox + tc * d[0]) ** 2 + (oz + tc * d[2]) ** 2 <= ob["a"] ** 2
    return np.minimum(side, np.where(inside & (tc > 1e-4), tc, np.inf))


def hit_cone(ob, o, d):
    # x^2 + z^2 = k^2 (h - y)^2 with k = radius / height; roots above the apex belong to the
    # mirrored upper cone and are discarded by the 0 <= y <= h test.
    k2 = (ob["a"] / ob["h"]) ** 2
    ox, oy, oz = o[0] - ob["center"][0], ob["h"] - o[1], o[2] - ob["center"][2]   # oy: below apex
    a = d[0] ** 2 + d[2] ** 2 - k2 * d[1] ** 2
    b = ox * d[0] + oz * d[2] + k2 * oy * d[1]
    best = np.full(d.shape[1], np.inf, np.float32)
    for t in _roots(a, b, ox ** 2 + oz ** 2 - k2 * oy ** 2):
        y = o[1] + t * d[1]
        best = np.minimum(best, np.where((t > 1e-4) & (y >= 0) & (y <= ob["h"]), t, np.inf))
    return best


HIT = {"cube": hit_cube, "sphere": hit_sphere, "cylinder": hit_cylinder, "cone": hit_cone}


def normals(ob, p):
    """Outward unit normals at surface points p (3, N) of `ob`, for shading."""
    q = p - np.array(ob["center"], np.float32)[:, None]
    if ob["shape"] == "cube":
        ql = _yaw(q, ob["yaw"])
        face = np.abs(ql).argmax(0)                            # the face hit is the dominant axis
        n = np.zeros_like(ql)
        n[face, np.arange(len(face))] = np.sign(ql[face, np.arange(len(face))])
        n = _yaw(n, -ob["yaw"])                                # back to world axes
    elif ob["shape"] == "cylinder":
        cap = p[1] > ob["h"] - 1e-3
        n = np.stack([np.where(cap, 0, q[0]), cap.astype(np.float32), np.where(cap, 0, q[2])])
    elif ob["shape"] == "cone":                                # gradient of the implicit surface
        n = np.stack([q[0], (ob["a"] / ob["h"]) ** 2 * (ob["h"] - p[1]), q[2]])
    else:
        n = q
    return n / np.linalg.norm(n, axis=0).clip(1e-6)


# -----------------------------------------------------------------------------
# The toy world: layout, caption, rendering

def make_object(shape, color, size, x, z, yaw):
    """Geometry of one object standing on the floor at (x, z)."""
    r = RADIUS[size]
    a, h = {"cube": (0.75 * r, 1.5 * r), "sphere": (r, 2 * r),      # a: half-width or radius
            "cylinder": (0.8 * r, 1.7 * r), "cone": (r, 2 * r)}[shape]
    return {"name": f"{color} {shape}", "shape": shape, "color": color, "size": size,
            "a": a, "h": h, "yaw": yaw, "center": [x, h / 2, z],
            "bound": {"cube": a * math.sqrt(3), "sphere": a}.get(shape, math.hypot(a, h / 2)),
            "foot": a * math.sqrt(2) if shape == "cube" else a}   # radii: bounding sphere, footprint


def _lens(r1, r2, d):
    """Area of the intersection of two discs with radii r1, r2 whose centres are d apart."""
    if d >= r1 + r2:
        return 0.0
    if d <= abs(r1 - r2):
        return math.pi * min(r1, r2) ** 2
    c1 = math.acos((d * d + r1 * r1 - r2 * r2) / (2 * d * r1))
    c2 = math.acos((d * d + r2 * r2 - r1 * r1) / (2 * d * r2))
    return r1 * r1 * c1 + r2 * r2 * c2 - 0.5 * math.sqrt(
        (-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2))


def sample_layout(rng, cam, n_objects=None, color=None):
    """1-4 objects (n_objects if given; all of one colour if given) with distinct names in front
    of the wall, all inside the frame, none hidden behind the others.

    Placement is checked on the projected bounding discs, not on pixels, so a (seed, index) gives
    the same scene at every resolution. A candidate that collides in 3-D, leaves the frame or would
    hide more than MAX_HIDDEN of a farther disc is redrawn (at most 30 times, then left out).
    Distinct names keep every entity name, and every relation in the caption, unambiguous.
    """
    objs, discs = [], []                                       # discs: (x, y, radius, depth), 0..1 units
    for _ in range(n_objects or rng.integers(1, 5)):
        for _ in range(100 if objs else 300):                  # every scene has an object
            u = rng.random(6).tolist()                         # one call: each rng call costs ~us
            ob = make_object(SHAPES[int(4 * u[0])], color or COLORS[int(8 * u[1])], SIZES[int(2 * u[2])],
                             0.0, 0.0, math.pi / 2 * u[4])
            # Aim at a random point of the image and stand the object where that ray meets the
            # height of its centre: objects land in view whatever the camera's height and pitch.
            ray = rotation(cam["pitch"], cam["roll"]) @ np.array(
                [(0.08 + 0.84 * u[5] - 0.5) / FOCAL, (0.5 - (0.2 + 0.7 * u[3])) / FOCAL, 1], np.float32)
            t = (ob["center"][1] - cam["height"]) / min(float(ray[1]), -1e-6)
            ob["center"][0], ob["center"][2] = float(t * ray[0]), float(t * ray[2])
            near = FOCAL * ob["bound"] / 0.42                  # far enough to fit in the frame
            nearest = cam["height"] / math.tan(cam["pitch"] + FOV / 2)   # the nearest floor in view
            far = min(max(4.0, nearest + 1), cam["wall"] - ob["foot"] - 0.2)  # big; never in the wall
            if not near <= ob["center"][2] <= far:
                continue
            x, y, zc = project(ob["center"], cam)
            rad = FOCAL * ob["bound"] / zc
            if (ob["name"] in [o["name"] for o in objs] or not rad < x < 1 - rad
                    or not rad < y < 1 - rad or any(
                        math.dist(ob["center"][::2], o["center"][::2]) < ob["foot"] + o["foot"] + 0.1
                        for o in objs)):
                continue
            cand = discs + [(x, y, rad, zc)]
            hidden = [sum(_lens(ri, rj, math.hypot(xi - xj, yi - yj)) / (math.pi * ri * ri)
                          for xj, yj, rj, zj in cand if zj < zi)         # nearer discs cover farther
                      for xi, yi, ri, zi in cand]
            if max(hidden) <= MAX_HIDDEN:
                objs.append(ob)
                discs.append(cand[-1])
                break
    return objs, discs


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def relations(objs, discs):
    """The spatial relations (i, relation, j) that are clear in the layout: behind / in front of
    from the depths, left / right of from the projected centres."""
    out = []
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            (xi, _, _, zi), (xj, _, _, zj) = discs[i], discs[j]
            if abs(zi - zj) > 1.0:                             # world units of depth
                out.append((i, "behind" if zi > zj else "in front of", j))
            elif abs(xi - xj) > 0.15:                          # fractions of the image width
                out.append((i, "left of" if xi < xj else "right of", j))
    return out


def full_caption(rng, objs, discs, floor):
    """A caption that names every object (sometimes with its size) and up to two relations: the
    `--captions full` ablation, text that says everything an image shows."""
    listed = [_a(f"{o['size']} {o['name']}" if rng.random() < 0.5 else o["name"]) for o in objs]
    listed = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    n = len(objs)
    count = ("One object", "Two objects", "Three objects", "Four objects")[n - 1]
    text = [f"{listed[0].upper()}{listed[1:]} on a {floor} floor.",
            f"A rendered scene with {listed}.",
            f"There {'is' if n == 1 else 'are'} {listed} on the {floor} floor.",
            f"{count} on a {floor} floor: {listed}.",
            f"A photo of {listed}."][rng.integers(5)]
    rel = relations(objs, discs)
    for k in rng.permutation(len(rel))[:2]:
        i, r, j = rel[k]
        a, b = objs[i]["name"], objs[j]["name"]
        text += [f" The {a} is {r} the {b}.", f" The {a} stands {r} the {b}.",
                 f" {_a(a).capitalize()} is {r} {_a(b)}."][rng.integers(3)]
    return text


# Web alt-text (the default): the paper's premise is that image-text data lacks spatial and fine
# detail because captions do not carry it, and SSL's published gains over CLIP (SLIP, SILC,
# SigLIP 2) come with partial, noisy captions. So each object is mentioned with probability
# WEB_MENTION (at least one, unless the caption is about nothing, WEB_NOTHING), its attributes are
# often dropped or generic, a colour or shape is sometimes wrong (WEB_WRONG), relations are rare.
WEB_MENTION, WEB_NOTHING, WEB_WRONG, WEB_RELATION = 0.6, 0.05, 0.08, 0.15
WEB_FORMS = (("full", 0.45), ("shape", 0.2), ("color", 0.2), ("generic", 0.15))  # how an object is named
WEB_TEMPLATES = ("{}", "{}.", "Photo of {}.", "{} on a {} floor", "CGI render of {}", "{} - stock image",
                 "Image may contain: {}", "A picture with {}.", "{}, computer graphics")
WEB_NOTHING_TEXT = ("untitled", "CGI rendering", "a rendered scene", "computer graphics image", "stock image")


def _web_phrase(rng, ob):
    """How alt-text names one object: "a red cube", "a cube", "something red", "an object"."""
    color, shape = ob["color"], ob["shape"]
    if rng.random() < WEB_WRONG:                               # a wrong colour or a wrong shape
        if rng.random() < 0.5:
            color = COLORS[(COLORS.index(color) + rng.integers(1, len(COLORS))) % len(COLORS)]
        else:
            shape = SHAPES[(SHAPES.index(shape) + rng.integers(1, len(SHAPES))) % len(SHAPES)]
    form = WEB_FORMS[int(np.searchsorted(np.cumsum([p for _, p in WEB_FORMS]), rng.random()))][0]
    if form == "full":
        return _a(f"{ob['size']} {color} {shape}" if rng.random() < 0.3 else f"{color} {shape}")
    if form == "shape":
        return _a(shape)
    if form == "color":
        return [f"something {color}", _a(f"{color} object"), f"{color} thing"][rng.integers(3)]
    return ["an object", "a thing", "a shape"][rng.integers(3)]


def web_caption(rng, objs, discs, floor):
    """A caption in the style of web alt-text (see WEB_MENTION above); the truth stays complete."""
    if rng.random() < WEB_NOTHING:
        return WEB_NOTHING_TEXT[rng.integers(len(WEB_NOTHING_TEXT))]
    mentioned = [i for i in range(len(objs)) if rng.random() < WEB_MENTION] or [int(rng.integers(len(objs)))]
    phrases = {i: _web_phrase(rng, objs[i]) for i in mentioned}
    listed = [phrases[i] for i in mentioned]
    listed = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    template = WEB_TEMPLATES[rng.integers(len(WEB_TEMPLATES))]
    text = template.format(listed, floor)
    rel = [(i, r, j) for i, r, j in relations(objs, discs) if i in phrases and j in phrases]
    if rel and rng.random() < WEB_RELATION:
        i, r, j = rel[rng.integers(len(rel))]
        text = text.rstrip(".") + f", {phrases[i]} {r} {phrases[j]}"
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


CAPTIONS = {"web": web_caption, "full": full_caption}


def trace(objs, discs, cam, size):
    """Primary rays against the room (floor, back wall), then each object; the nearest hit wins.

    Returns depth (N,) camera z (sky = inf), kind (N,) 0 = sky, 1 = floor, 2 = wall, 3 + i = object
    i, the rays d (3, N) and how many pixels each object covers when seen on its own. An object is
    only traced inside a box around its projected disc (1.3x: perspective stretches off-axis discs).
    """
    o = np.array([[0], [cam["height"]], [0]], np.float32)    # the camera, `height` above the origin
    d = world_rays(size, cam)                                  # (3, N), N = S * S
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        floor = np.where(d[1] < 0, -cam["height"] / d[1], np.inf)
        wall = np.where(d[2] > 0, cam["wall"] / d[2], np.inf)  # the plane z = wall, facing the camera
        wall = np.where(cam["height"] + wall * d[1] <= cam["wall_height"], wall, np.inf)
        depth = np.minimum(floor, wall)
        kind = np.where(np.isinf(depth), 0, np.where(wall < floor, 2, 1)).astype(np.uint8)
        depth, kind = depth.reshape(size, size), kind.reshape(size, size)
        unoccluded = []
        for i, (ob, (x, y, rad, _)) in enumerate(zip(objs, discs)):
            x0, x1 = (min(max(int((x + s * 1.3 * rad) * size + s), 0), size) for s in (-1, 1))
            y0, y1 = (min(max(int((y + s * 1.3 * rad) * size + s), 0), size) for s in (-1, 1))
            t = HIT[ob["shape"]](ob, o, d.reshape(3, size, size)[:, y0:y1, x0:x1].reshape(3, -1))
            t = t.reshape(y1 - y0, x1 - x0)
            nearer = t < depth[y0:y1, x0:x1]
            depth[y0:y1, x0:x1][nearer] = t[nearer]
            kind[y0:y1, x0:x1][nearer] = 3 + i
            unoccluded.append(np.isfinite(t).sum())
    return depth.ravel(), kind.ravel(), d, unoccluded


def _fade(footprint, cell):
    """Texture contrast that fades where a pixel spans a whole cell (cheap anti-aliasing)."""
    return np.clip(1 - footprint / cell, 0, 1) ** 2


def shade(objs, room, light, depth, kind, d, size):
    """Colours (N, 3) of traced pixels: sky gradient, the lit floor checkerboard with object
    shadows, the wall's brick courses, Lambert + Blinn-Phong objects, then aerial perspective."""
    o = np.array([[0], [room["height"]], [0]], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        p = o + d * np.where(np.isinf(depth), 0, depth)       # hit points, (3, N)
        dist = np.sqrt((d * d).sum(0))
        rgb = np.empty((len(depth), 3), np.float32)
        sky = kind == 0
        rgb[sky] = HORIZON + np.sqrt(np.clip(d[1, sky] / dist[sky] * 3, 0, 1))[:, None] * (ZENITH - HORIZON)

        # Floor: a rotated checkerboard, lit by `light` and darkened where an object blocks it.
        fl = np.flatnonzero(kind == 1)
        pf = p[:, fl]
        ca, sa = math.cos(room["angle"]) / room["cell"], math.sin(room["angle"]) / room["cell"]
        check = np.floor(ca * pf[0] + sa * pf[2] + room["shift"][0]) + np.floor(ca * pf[2] - sa * pf[0] + room["shift"][1])
        footprint = depth[fl] * dist[fl] / (-d[1, fl] * FOCAL * size)  # floor units per pixel
        tone0, tone1 = (np.array(c, np.float32) for c in FLOORS[room["floor"]])
        albedo = (tone0 + tone1) / 2 + ((check % 2 - 0.5) * _fade(footprint, room["cell"]))[:, None] * (tone1 - tone0)
        lit = np.ones(len(fl), np.float32)
        for ob in objs:
            # A floor point P is in shadow if P + s * light hits the object. At the height of the
            # centre that ray is within bound / light_y of it: a cheap test before the exact one.
            up = ob["center"][1] / light[1]
            qx, qz = pf[0] + up * light[0] - ob["center"][0], pf[2] + up * light[2] - ob["center"][2]
            near = np.flatnonzero(qx * qx + qz * qz <= (ob["bound"] / light[1]) ** 2)
            hit = HIT[ob["shape"]](ob, pf[:, near], light[:, None])       # one direction for all
            lit[near[np.isfinite(hit)]] = 0
        rgb[fl] = albedo * (0.45 + 0.55 * light[1] * lit)[:, None]

        # Wall: brick courses half a floor cell high, every other course shifted by half a brick
        # (a texture gradient: one more cue to its distance), lit from the front.
        wl = np.flatnonzero(kind == 2)
        b = room["cell"] / 2
        course = np.floor(p[1, wl] / b)
        brick = np.floor(p[0, wl] / (2 * b) + 0.5 * (course % 2))
        tone0, tone1 = (np.array(c, np.float32) for c in WALLS[room["wall_tone"]])
        footprint = depth[wl] / (FOCAL * size)
        albedo = (tone0 + tone1) / 2 + (((course + brick) % 2 - 0.5) * _fade(footprint, b))[:, None] * (tone1 - tone0)
        rgb[wl] = albedo * (0.45 + 0.55 * max(-float(light[2]), 0.0))

        # Objects: Lambert + ambient, and a small Blinn-Phong highlight for a sense of material.
        for i, ob in enumerate(objs):
            px = np.flatnonzero(kind == i + 3)
            n = normals(ob, p[:, px])
            half = light[:, None] - d[:, px] / dist[px]
            spec = np.clip((n * half).sum(0) / np.sqrt((half * half).sum(0)), 0, 1) ** 24
            diffuse = 0.35 + 0.65 * np.clip(light @ n, 0, 1)
            rgb[px] = RGB[COLORS.index(ob["color"])] * diffuse[:, None] + 0.3 * spec[:, None]

        # Aerial perspective: far things fade towards the horizon (a depth cue; it also hides aliasing).
        rgb += (1 - np.exp(np.where(np.isinf(depth), 0, depth) / -30))[:, None] * (HORIZON - rgb)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(size, size, 3)


def describe(objs, discs, seg, unoccluded):
    """The truth of each object as render_scene reports it (visible box, visibility, area)."""
    size, objects = seg.shape[0], []
    for i, (ob, (x, y, rad, _)) in enumerate(zip(objs, discs)):
        m = seg == i + 2
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if len(rows):
            box = (cols[0] / size, rows[0] / size, (cols[-1] + 1) / size, (rows[-1] + 1) / size)
        else:                                                  # below one pixel (tiny images): its disc
            box = (max(x - rad, 0), max(y - rad, 0), min(x + rad, 1), min(y + rad, 1))
        objects.append({k: ob[k] for k in ("name", "shape", "color", "size")} | {
            "box": [round(float(b), 6) for b in box],
            "visible": round(float(m.sum() / max(unoccluded[i], 1)), 4),
            "area": round(float(m.mean()), 6), "center": [round(c, 4) for c in ob["center"]]})
    return objects


def render_scene(seed, index, size=64, captions="web", world="toy"):
    """Render scene `index` of the toy world with seed `seed` at size x size pixels (world="shapes":
    the shape-only world, one white object before a fixed room, light and camera).

    Returns {"image": uint8 (S, S, 3), "depth": float32 (S, S) metric camera z, sky = inf,
    "seg": uint8 (S, S) 0 = sky, 1 = the room (floor or wall), 2 + i = object i, "objects":
    [{"name", "shape", "color", "size", "box" (of the visible mask, 0..1), "visible" (fraction
    not occluded), "area" (fraction of the image), "center" (world xyz)}], "caption", "count",
    "camera"}. `captions` is "web" (alt-text that leaves things out) or "full" (names everything);
    the caption has its own random stream, so both styles describe the very same image.
    """
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; valid worlds are {', '.join(WORLDS)}")
    rng = np.random.default_rng([seed, index])
    if world == "shapes":
        cam, room = dict(SHAPES_CAMERA), SHAPES_CAMERA | SHAPES_ROOM
        light = np.array([0.4, 1.7, -0.6], np.float32)
        objs, discs = sample_layout(rng, cam, n_objects=1, color=SHAPES_COLOR)
    else:
        cam = sample_camera(rng)
        light = np.array([rng.uniform(-1, 1), rng.uniform(1.2, 2.2), rng.uniform(-1, 0.3)], np.float32)
        room = cam | {"floor": list(FLOORS)[rng.integers(len(FLOORS))], "wall_tone": int(rng.integers(len(WALLS))),
                      "cell": rng.uniform(0.5, 1.0), "angle": rng.uniform(0, math.pi / 2), "shift": rng.uniform(0, 2, 2)}
        objs, discs = sample_layout(rng, cam)
    light /= np.linalg.norm(light)
    caption = CAPTIONS[captions](np.random.default_rng([seed, index, 1]), objs, discs, room["floor"])
    depth, kind, d, unoccluded = trace(objs, discs, cam, size)
    image = shade(objs, room, light, depth, kind, d, size)
    seg = np.where(kind >= 3, kind - 1, np.minimum(kind, 1)).astype(np.uint8).reshape(size, size)
    return {"image": image, "depth": depth.reshape(size, size), "seg": seg,
            "objects": describe(objs, discs, seg, unoccluded), "caption": caption, "count": len(objs),
            "camera": cam}


# -----------------------------------------------------------------------------
# Shards: webdataset-layout tars, grouped by key, read without extracting to disk

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
VAL_OFFSET = 10 ** 9            # validation scenes use indices from here on: disjoint from any train set


class BadSample(Exception):
    """A sample that cannot be used (corrupt image, missing caption, unreadable label, ...)."""


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_depth_png(inv, valid=None):
    """Relative inverse depth (h, w) -> 16-bit PNG bytes: 0 = no label, 1..65535 = far..near.

    The valid pixels' min..max is stretched over 1..65535, which keeps relative inverse depth
    (all the experts give) and stores it at ~1.5e-5 resolution in a compact lossless image.
    """
    inv = np.asarray(inv, np.float64)
    valid = np.isfinite(inv) if valid is None else np.asarray(valid, bool) & np.isfinite(inv)
    q = np.zeros(inv.shape, np.uint16)
    if valid.any():
        lo, hi = inv[valid].min(), inv[valid].max()
        q[valid] = np.round(1 + (inv[valid] - lo) / max(hi - lo, 1e-12) * 65534)
    return _png(q)                                             # PIL writes uint16 as mode "I;16"


def decode_depth_png(b):
    """16-bit depth PNG bytes -> (inverse depth float32 (h, w) in 0..1, valid bool (h, w))."""
    q = np.asarray(Image.open(io.BytesIO(b)), np.float32)
    if q.ndim != 2:
        raise ValueError(f"depth PNG must have one channel, not shape {q.shape}")
    valid = q > 0
    return np.where(valid, (q - 1) / 65534, 0).astype(np.float32), valid


def _split_name(name):
    """"dir/000000123.depth.png" -> ("dir/000000123", "depth.png"): the key ends at the first dot."""
    head, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None, None
    stem, ext = base.split(".", 1)
    return os.path.join(head, stem), ext.lower()


def iter_tar(path):
    """Yield (key, {ext: bytes}) for each sample of a shard, in order, in one streaming pass."""
    with tarfile.open(path, "r|*") as tar:                     # "r|": sequential, no seeking
        key, members = None, {}
        for info in tar:
            k, ext = _split_name(info.name)
            if not info.isfile() or k is None:
                continue
            if k != key and members:                           # webdataset: a key's members are adjacent
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(info).read()
        if members:
            yield key, members


def write_shard(path, samples):
    """Write (key, {ext: bytes}) samples to a tar at `path` atomically; returns how many.

    The tar is written to a temporary name and renamed, so a reader never sees half a shard, and
    with mtime 0 the same samples always give the same bytes.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    n = 0
    try:
        with tarfile.open(tmp, "w") as tar:
            for key, members in samples:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def expand_shards(shards):
    """A glob string or a list of paths -> sorted list of shard paths (error if none)."""
    paths = sorted(glob.glob(shards)) if isinstance(shards, str) else list(shards)
    if not paths:
        raise FileNotFoundError(f"no shards match {shards!r}")
    return paths


def count_samples(shards):
    """Number of samples (distinct keys) in the shards, from the tar headers alone."""
    total = 0
    for path in expand_shards(shards):
        with tarfile.open(path) as tar:                        # random access: seeks over the data
            total += len({_split_name(m.name)[0] for m in tar if m.isfile()} - {None})
    return total


def scene_members(scene, seed, index):
    """A rendered toy scene -> its shard members (image, caption, probe labels and the truth)."""
    labels = [{k: o[k] for k in ("name", "shape", "color", "size")} for o in scene["objects"]]
    depth = io.BytesIO()
    np.save(depth, scene["depth"])
    return {"png": _png(scene["image"]), "txt": scene["caption"].encode(),
            "json": json.dumps({"count": scene["count"], "objects": labels, "seed": seed,
                                "index": index}).encode(),
            "gt_depth.npy": depth.getvalue(),
            "gt.json": json.dumps({"count": scene["count"], "objects": scene["objects"],
                                   "camera": scene["camera"]}).encode(),
            "gt_seg.png": _png(scene["seg"])}


def _check_ground(g):
    """Validate a ground.json payload: {"entities": [{"name", "box" in 0..1, "score"}], ...}."""
    if not isinstance(g, dict) or not isinstance(g.get("entities"), list):
        raise ValueError("expected {'entities': [...]}")
    for e in g["entities"]:
        box = e.get("box") if isinstance(e, dict) else None
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"].strip()
                and isinstance(e.get("score", 0.0), (int, float)) and isinstance(box, list)
                and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"malformed entity {e!r}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"box {box} of {e['name']!r} is not inside 0..1")
    return g


def _decode_image(b):
    with Image.open(io.BytesIO(b)) as im:
        return np.array(im.convert("RGB"))                     # convert() loads: truncation raises here


DECODERS = {                                                   # member -> (output name, decoder)
    "json": ("meta", json.loads),
    "depth.png": ("depth", decode_depth_png),
    "ground.json": ("ground", lambda b: _check_ground(json.loads(b))),
    "gt_depth.npy": ("gt_depth", lambda b: np.load(io.BytesIO(b), allow_pickle=False)),
    "gt.json": ("gt", json.loads),
    "gt_seg.png": ("gt_seg", lambda b: np.asarray(Image.open(io.BytesIO(b)))),
}


def _decode(members, ext, decode):
    try:
        return decode(members[ext])
    except Exception as e:                                     # whatever PIL, json, numpy or utf-8 raise
        raise BadSample(f"unreadable {ext} ({type(e).__name__}: {e})") from None


def decode_sample(key, members):
    """Raw members -> {"key", "image" uint8 (H, W, 3), "caption", "meta", and any labels present}.

    Raises BadSample naming the member at fault, so one bad file costs one sample, not a run.
    """
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise BadSample("no image member")
    if "txt" not in members:
        raise BadSample("missing caption (.txt)")
    out = {"key": key, "image": _decode(members, ext, _decode_image), "meta": {},
           "caption": _decode(members, "txt", lambda b: b.decode("utf-8").strip())}
    if not out["caption"]:
        raise BadSample("empty caption")
    for member, (name, decode) in DECODERS.items():
        if member in members:
            out[name] = _decode(members, member, decode)
    if "depth" in out:
        out["depth"], out["depth_valid"] = out["depth"]
        if any(d > i for d, i in zip(out["depth"].shape, out["image"].shape)):
            raise BadSample(f"depth.png {out['depth'].shape} is larger than the image")
    return out


# -----------------------------------------------------------------------------
# Streaming reader: split over ranks and workers, shuffle buffer, exact resume

class ShardDataset(torch.utils.data.IterableDataset):
    """Stream decoded (and optionally transformed and batched) samples from tar shards.

    The stream is split over (rank, dataloader worker) pairs: by whole shards when there are at
    least as many shards as pairs, else by sample index, so every sample is seen exactly once per
    epoch. Use with DataLoader(ds, batch_size=None, num_workers=W): batching happens here, so
    augmentation and collation run in the workers.

    Exact resume: the DataLoader takes batch i from worker i % W. With skip_batches=k, worker j
    of the new loader plays the part of worker (j + k) % W of the old one and skips the raw
    samples of its share of the first k batches without decoding them. Each sample's transform
    rng is seeded by (seed, epoch, stream position), so skipped-then-resumed equals uninterrupted.
    (Bad samples are only found by decoding: one inside the skipped span shifts the resumed
    stream by one sample.)
    """

    def __init__(self, shards, *, transform=None, batch_size=None, collate=None, shuffle_buffer=0,
                 seed=0, repeat=False, skip_batches=0, require=(), rank=None, world=None):
        super().__init__()
        self.shards = expand_shards(shards)
        if (batch_size is None) != (collate is None):
            raise ValueError("batch_size and collate go together")
        self.transform, self.batch_size, self.collate = transform, batch_size, collate
        self.shuffle_buffer, self.seed, self.repeat = shuffle_buffer, seed, repeat
        self.skip_batches, self.require = skip_batches, tuple(require)
        self.rank, self.world = rank, world                    # None: from torch.distributed, or 0 of 1
        self.bad = 0                                           # per process: each worker counts its own

    def _split(self):
        """(this stream's index, number of streams, worker, workers) for this rank and worker."""
        if self.rank is not None:                              # given by hand (tests, other launchers)
            rank, world = self.rank, self.world
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.skip_batches) % workers        # resumed loaders continue the round-robin
        return rank * workers + worker, world * workers, worker, workers

    def _raw(self, epoch, split, n_splits):
        """This stream's (shard, key, members) for one epoch, before shuffling."""
        shards = self.shards
        if self.shuffle_buffer:                                # same order on every rank and worker
            order = np.random.default_rng([self.seed, epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        mine = shards[split::n_splits] if len(shards) >= n_splits else shards
        index = 0
        for path in mine:
            try:
                for key, members in iter_tar(path):
                    if len(shards) >= n_splits or index % n_splits == split:
                        yield path, key, members
                    index += 1
            except (tarfile.TarError, OSError, EOFError) as e:  # a truncated or corrupt tar
                self._warn(f"{path}: unreadable shard, the rest of it is skipped ({e})")

    def _shuffle(self, items, rng):
        """Shuffle with a buffer: draw a random element, refill its slot with the next item."""
        buf = []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.integers(len(buf))
            yield buf[j]
            buf[j] = item
        rng.shuffle(buf)
        yield from buf

    def _warn(self, message):
        self.bad += 1
        print(f"data: skipped {message}", file=sys.stderr)

    def __iter__(self):
        split, n_splits, worker, workers = self._split()
        k = self.skip_batches
        skip = (self.batch_size or 1) * (k // workers + (worker < k % workers))  # raw samples to skip
        batch, epoch = [], 0
        while True:
            items = self._raw(epoch, split, n_splits)
            if self.shuffle_buffer:
                items = self._shuffle(items, np.random.default_rng([self.seed, epoch, split]))
            used = 0                                           # samples skipped for resume or decoded
            for position, (path, key, members) in enumerate(items):
                if skip:
                    skip, used = skip - 1, used + 1
                    continue
                try:
                    missing = [m for m in self.require if m not in members]
                    if missing:
                        raise BadSample(f"missing {', '.join(missing)}")
                    sample = decode_sample(key, members)
                except BadSample as e:
                    self._warn(f"sample {key} in {path}: {e}")
                    continue
                used += 1
                if self.transform is not None:           # position counts every sample of the stream
                    rng = np.random.default_rng([self.seed, epoch, position * n_splits + split])
                    sample = self.transform(sample, rng)
                if self.batch_size is None:
                    yield sample
                    continue
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self.collate(batch)
                    batch = []
            epoch += 1
            if not self.repeat:
                break
            if not used:                                       # repeating would spin forever
                raise RuntimeError(f"stream {split} of {n_splits} has no usable samples in "
                                   f"{len(self.shards)} shard(s); use fewer dataloader workers")
        if batch:
            yield self.collate(batch)


# -----------------------------------------------------------------------------
# Views: label-consistent crops and flips, colour jitter, multi-crop, iBOT masks

@dataclass
class AugConfig:
    """How make_views draws its views (DINO-style multi-crop; crops and flips move the labels too)."""
    size: int = 64                          # global views (the model's input size)
    local_size: int = 32                    # DINO local crops
    n_local: int = 4
    global_scale: tuple = (0.35, 1.0)       # crop area range, as a fraction of the image (DINO)
    caption_scale: tuple = (0.9, 1.0)       # view 0 with clip: its caption must stay true (open_clip)
    local_scale: tuple = (0.1, 0.35)
    flip: float = 0.5                       # probability of a horizontal flip
    jitter: float = 0.4                     # brightness/contrast/saturation factors in 1 +- jitter
    caption_jitter: float = None            # the same on view 0 with clip; None = jitter (SLIP's CLIP view: 0)
    # DINO's colour augmentation beyond that, on the views only ssl reads (the second global view and
    # the local crops; view 0 too when no caption or grounding name describes it): a hue shift in +-hue of the colour
    # circle and grayscale with probability `grayscale`. Without them an object's colour alone
    # solves the self-distillation task in the toy world, and the features need learn no shape.
    hue: float = 0.1
    grayscale: float = 0.2
    min_visible: float = 0.3                # a box survives a crop if this much of its area does
    mask_ratio: tuple = (0.1, 0.5)          # iBOT: fraction of a masked view's patches masked
    mask_min_block: int = 4                 # smallest block of the iBOT mask, in patches (BEiT, iBOT: 4)
    # The share of images whose view is masked (iBOT: 0.5, DINOv2's mask_sample_probability 0.5) and
    # which ssl views are masked: "last" (one view) or "both" (iBOT masks both global views).
    mask_prob: float = 1.0
    mask_views: str = "last"
    # With clip and ssl: "shared" = DINO's two global views are the caption view and one more (the
    # caption view is scored by SigLIP and self-distilled); "separate" = two more global views for
    # ssl alone and the caption view for clip, depth and ground only (SigLIP 2's split).
    ssl_views: str = "shared"
    patch_size: int = 8


def random_crop(rng, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's parameters (top, left, h, w) in pixels, drawn from a numpy rng."""
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    return 0, 0, height, width                                 # rare fallback: the whole image


def _crop_map(m, region, flip, size):
    """Crop a label map m (h, w) to `region` (x0, y0, x1, y1 in 0..1), resampled to size x size.

    Nearest neighbour, so a label is never blended with an invalid neighbour; relative
    coordinates, so a depth map smaller than the image still lines up with it.
    """
    x0, y0, x1, y1 = region
    centres = (np.arange(size) + 0.5) / size                   # output pixel centres in 0..1
    cols = ((x0 + centres * (x1 - x0)) * m.shape[1]).astype(int).clip(0, m.shape[1] - 1)
    rows = ((y0 + centres * (y1 - y0)) * m.shape[0]).astype(int).clip(0, m.shape[0] - 1)
    out = m[rows[:, None], cols[None, :]]
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _box_area(b):
    return (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)


def crop_and_flip(sample, crop, flip, size, min_visible=0.3):
    """The geometric part of a view: crop (top, left, h, w) in image pixels, resize, maybe flip.

    Returns {"image": uint8 (3, size, size)} plus, for the labels the sample carries,
    "depth" float32 (size, size) and "depth_valid" bool (size, size) cropped from the same region,
    "boxes" float32 (M, 4) in view coordinates and "names": boxes are clipped to the crop and
    dropped if less than `min_visible` of their area survives.
    """
    top, left, h, w = crop
    height, width = sample["image"].shape[:2]
    region = (left / width, top / height, (left + w) / width, (top + h) / height)
    image = torch.from_numpy(sample["image"]).permute(2, 0, 1)  # (3, H, W) uint8
    image = _tf().resized_crop(image, top, left, h, w, [size, size], antialias=True)
    out = {"image": image.flip(-1) if flip else image}
    if "depth" in sample:
        out["depth"] = torch.from_numpy(_crop_map(sample["depth"], region, flip, size))
        out["depth_valid"] = torch.from_numpy(_crop_map(sample["depth_valid"], region, flip, size))
    if "ground" in sample:
        entities = sample["ground"]["entities"]
        boxes = np.array([e["box"] for e in entities], np.float64).reshape(-1, 4)
        scale = np.array([region[2] - region[0], region[3] - region[1]] * 2)
        moved = (boxes - np.array(region[:2] * 2)) / scale      # (M, 4) in crop coordinates
        clipped = moved.clip(0, 1)
        keep = _box_area(clipped) >= min_visible * _box_area(moved)
        clipped = clipped[keep]
        if flip:                                               # x -> 1 - x swaps left and right edges
            clipped = np.stack([1 - clipped[:, 2], clipped[:, 1], 1 - clipped[:, 0], clipped[:, 3]], 1)
        out["boxes"] = torch.tensor(clipped, dtype=torch.float32).reshape(-1, 4)
        out["names"] = [e["name"] for e, k in zip(entities, keep) if k]
    return out


def _tf():
    """torchvision's functional transforms, imported on first use: torchvision takes seconds to
    import, and only the training views need it (not evaluate.py, the readers or the world)."""
    import torchvision.transforms.v2.functional as TF

    return TF


def _photometric(image, rng, jitter, hue=0.0, grayscale=0.0):
    """uint8 (3, S, S) -> float (3, S, S) with brightness/contrast/saturation jitter, then (where
    asked) a hue shift and grayscale, normalised with SigLIP's mean = std = 0.5. Photometric only:
    labels are unaffected."""
    TF = _tf()
    x = image.float() / 255
    if jitter:
        b, c, s = rng.uniform(1 - jitter, 1 + jitter, 3)
        x = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
    if hue:
        x = TF.adjust_hue(x, rng.uniform(-hue, hue))
    if grayscale and rng.random() < grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return (x - 0.5) / 0.5


def block_mask(rng, grid, ratio, min_block=4):
    """iBOT's block-wise mask (from BEiT) on a grid x grid patch grid: (grid * grid,) bool.

    Random rectangles of patches (area >= min_block where possible, aspect 0.3..3.3) are added,
    each only if it does not overshoot, until the drawn fraction of the patches is masked. BEiT's
    and iBOT's smallest block is 4 patches of a 14 x 14 grid (2 %); on the toy's 4 x 4 grid 4
    patches are a quarter of the image, as large as a whole object: min_block=1 lets the mask
    hide part of an object (data.AugConfig.mask_min_block).
    """
    target = round(rng.uniform(*ratio) * grid * grid)
    mask = np.zeros((grid, grid), bool)
    for _ in range(20 * grid * grid):                          # bounded; nearly always ends far sooner
        left = target - int(mask.sum())
        if left <= 0:
            break
        area = rng.uniform(min(min_block, left), left)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h = min(grid, max(1, round(math.sqrt(area * aspect))))
        w = min(grid, max(1, round(math.sqrt(area / aspect))))
        top, lft = rng.integers(grid - h + 1), rng.integers(grid - w + 1)
        if 0 < (~mask[top:top + h, lft:lft + w]).sum() <= left:
            mask[top:top + h, lft:lft + w] = True
    return torch.from_numpy(mask.ravel())


LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_caption(text):
    """The caption of the horizontally mirrored image: "left" and "right" swap, case kept."""
    swap = {"left": "right", "right": "left"}
    return LEFT_RIGHT.sub(lambda m: swap[m[0].lower()].capitalize() if m[0][0].isupper()
                          else swap[m[0].lower()], text)


def make_views(sample, rng, aug, tasks):
    """One decoded sample -> the tensors the enabled tasks train on (see the keys below).

    Global view 0 carries every label (depth, boxes); with "ssl" a second global view (masked for
    iBOT) and `n_local` small local crops are added, as in DINO's multi-crop. With clip and
    aug.ssl_views == "separate" two ssl views follow view 0 (3 global views): ssl reads the last two.
    """
    tasks = set(tasks)
    for task, label, member in (("depth", "depth", "depth.png"), ("ground", "ground", "ground.json")):
        if task in tasks and label not in sample:
            raise ValueError(f"sample {sample['key']} has no {member}, which task {task!r} needs; "
                             "run pseudolabel.py on the shards first")
    height, width = sample["image"].shape[:2]
    labelled = {"image": sample["image"]}                      # view 0 carries the enabled tasks' labels
    if "depth" in tasks:
        labelled |= {"depth": sample["depth"], "depth_valid": sample["depth_valid"]}
    if "ground" in tasks:
        labelled["ground"] = sample["ground"]

    def view(scale, size, source=None, ssl_only=False, jitter=aug.jitter):
        crop, flip = random_crop(rng, height, width, scale), rng.random() < aug.flip
        geo = crop_and_flip(source or {"image": sample["image"]}, crop, flip, size, aug.min_visible)
        colour = (aug.hue, aug.grayscale) if ssl_only else (0.0, 0.0)
        return _photometric(geo.pop("image"), rng, jitter, *colour), geo, flip

    # View 0 is the one its caption describes: with clip it is cropped only a little (open_clip
    # crops at 0.9-1, so named objects stay in view) and a flip swaps "left" and "right" in the
    # caption (as MDETR does), so that the caption stays true of the view. Without a task that
    # reads text about it (caption or grounding names, which name colours) it is an ssl view like
    # the others and gets DINO's colour augmentation too, as both of DINO's global views do.
    first, geo, flipped = view(aug.caption_scale if "clip" in tasks else aug.global_scale, aug.size, labelled,
                               ssl_only="ssl" in tasks and not tasks & {"clip", "ground"},
                               jitter=aug.jitter if aug.caption_jitter is None or "clip" not in tasks
                               else aug.caption_jitter)
    out = {"caption": mirror_caption(sample["caption"]) if flipped else sample["caption"], **geo}
    if "ssl" in tasks:
        separate = aug.ssl_views == "separate" and "clip" in tasks
        n_ssl = 2 if separate else 1                           # ssl views beyond the caption view
        out["global"] = torch.stack([first] + [view(aug.global_scale, aug.size, ssl_only=True)[0]
                                               for _ in range(n_ssl)])  # (2 or 3, 3, S, S): ssl reads the last 2
        if aug.n_local:
            out["local"] = torch.stack([view(aug.local_scale, aug.local_size, ssl_only=True)[0]
                                        for _ in range(aug.n_local)])               # (n_local, 3, s, s)
        def mask():  # an unmasked view (with probability 1 - mask_prob) has no iBOT target
            grid = aug.size // aug.patch_size
            if aug.mask_prob < 1 and rng.random() >= aug.mask_prob:
                return torch.zeros(grid * grid, dtype=torch.bool)
            return block_mask(rng, grid, aug.mask_ratio, aug.mask_min_block)
        out["ibot_mask"] = mask()                              # (N,) the last ssl view's
        if aug.mask_views == "both":
            out["ibot_mask_first"] = mask()                    # (N,) the first ssl view's
    else:
        out["global"] = first[None]                            # (1, 3, S, S)
    return out


SIZE_WORDS = {"small", "large", "big", "little", "tiny", "huge"}


def entity_id(name):
    """The grounding class of an entity name: crc32 of its words without size adjectives, so that
    "small red cube" in one image and "red cube" in another are one class (positives of each
    other) rather than negatives; the text each is embedded from stays as written."""
    words = [w for w in name.lower().split() if w not in SIZE_WORDS]
    return zlib.crc32(" ".join(words or name.lower().split()).encode())


def tokenize_names(tokenize, names):
    """Entity names -> (len(names), tokenize.name_length) ids. Names are short, so they take the
    tokenizer's name_length positions, not the caption context; the text tower pools the last
    position, so a name tokenized at another length embeds differently. This is the one place
    names are tokenized: training (collate) and evaluation (grounding) must agree."""
    return tokenize(list(names) or [""], length=tokenize.name_length)[: len(names)]


def collate(samples, tokenize):
    """make_views outputs -> a batch dict. Views are stacked view-major ((G * B, ...): every sample's
    view 0, then every view 1), the layout DINO's loss expects. Boxes are padded to the batch's
    largest count; their names are tokenized (`tokenize.name_length` positions) in row-major order
    with a crc32 id each, so that equal names are recognised as one class across the batch and
    across ranks."""
    batch = {}
    for key in ("global", "local"):
        if key in samples[0]:
            views = torch.stack([s[key] for s in samples], 1)  # (G, B, 3, S, S)
            batch[key] = views.flatten(0, 1)                   # (G * B, 3, S, S)
    for key in ("ibot_mask", "ibot_mask_first", "depth", "depth_valid"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    batch["text"] = tokenize([s["caption"] for s in samples])  # (B, T)
    if "boxes" in samples[0]:
        m = max(len(s["boxes"]) for s in samples)
        batch["boxes"] = torch.zeros(len(samples), m, 4)       # (B, M, 4)
        batch["box_valid"] = torch.zeros(len(samples), m, dtype=torch.bool)
        for i, s in enumerate(samples):
            batch["boxes"][i, :len(s["boxes"])] = s["boxes"]
            batch["box_valid"][i, :len(s["boxes"])] = True
        names = [n for s in samples for n in s["names"]]
        batch["name_tokens"] = tokenize_names(tokenize, names)  # (R, T')
        batch["name_id"] = torch.tensor([entity_id(n) for n in names], dtype=torch.int64)
    return batch


# -----------------------------------------------------------------------------
# Real benchmarks as their users download them: readers for evaluate.py. Each returns plain
# lists and arrays and raises BenchmarkError with one line naming what is missing or malformed.


class BenchmarkError(ValueError):
    """A benchmark folder that is not in the layout its reader expects (evaluate.py: exit 2)."""


WNID = re.compile(r"n\d{8}")  # WordNet synset ids, the folder names of the standard ImageNet layout


def image_files(folder):
    """Image files of a folder (any extension of IMAGE_EXTS, any case), sorted."""
    return sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().rsplit(".", 1)[-1] in IMAGE_EXTS)


def load_image(path, size=None):
    """Any image file -> uint8 (H, W, 3) RGB; with size, resized bicubic to the square input as
    SigLIP's image processor does (no crop)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        return np.asarray(im.resize((size, size), Image.BICUBIC) if size else im)


def read_png(path):
    """A label map or 16-bit depth PNG as stored (uint8 / uint16 array)."""
    with Image.open(path) as im:
        return np.asarray(im)


def read_synset_mapping(path):
    """LOC_synset_mapping.txt layout: "FOLDER name, synonym, ..." per line -> {FOLDER: name}."""
    names = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.strip().partition(" ")
            if key and rest:
                names[key] = rest.split(",")[0].strip()
    return names


IMAGENET_TRAIN_PER_CLASS = 50  # the probes' full-batch fits hold every training feature (and a one-hot row)


def read_imagenet(root, train_per_class=IMAGENET_TRAIN_PER_CLASS):
    """ILSVRC2012 in the usual folder layout: ROOT/val/CLASS/*.JPEG (enough for zero-shot; the val
    archive ships flat, and the common valprep script sorts it into class folders) and, if
    present, ROOT/train/CLASS/*.JPEG, of which the first `train_per_class` per class (by name)
    train the linear and k-NN probes: all 1.28M would need ~30 GB for the full-batch fit. Classes
    are val's folders, sorted (for WordNet ids: the class index order). Returns (classes, {split:
    [(path, class index), ...]})."""
    if not os.path.isdir(os.path.join(root, "val")):
        raise BenchmarkError(f"--imagenet {root}: no val/ folder (ILSVRC2012 layout: val/CLASS/*.JPEG)")
    classes = sorted(e.name for e in os.scandir(os.path.join(root, "val")) if e.is_dir())
    sets = {}
    for split in ["val"] + ["train"] * os.path.isdir(os.path.join(root, "train")):
        keep = train_per_class if split == "train" else None
        sets[split] = [(f, k) for k, c in enumerate(classes) for f in image_files(os.path.join(root, split, c))[:keep]]
        if not sets[split]:
            raise BenchmarkError(f"--imagenet {root}: no images in {split}/CLASS/ folders")
        need_decodable([f for f, _ in sets[split]], "--imagenet")
    return classes, sets


def read_json(path, flag):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"{flag}: cannot read {path} ({type(e).__name__}: {e})") from None


def need_files(paths, flag, what):
    if missing := [p for p in paths if not os.path.isfile(p)]:
        raise BenchmarkError(f"{flag}: {len(missing)} {what} missing, e.g. {missing[0]}")


def need_decodable(paths, flag):
    """Decode every image a benchmark reads before any work (NAVI: every wild-set photo, of which
    the pairs use some): real downloads hold truncated
    JPEGs and error pages saved under an image's name, which would otherwise end evaluate.py in a
    traceback, perhaps after its heads trained for many minutes. JPEGs decode at 1/8 scale (draft
    mode), which still reads every byte, so the check costs a fraction of the evaluation."""
    from tqdm import tqdm  # only the readers need it

    for p in tqdm(paths, desc=f"{flag}: decoding", leave=False, disable=len(paths) < 200):
        try:
            with Image.open(p) as im:
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:  # PIL's errors
            raise BenchmarkError(f"{flag}: {p} cannot be decoded ({type(e).__name__}: {e})") from None


def pad_square(image, fill=255):
    """uint8 (h, w, 3) -> (s, s, 3), s = max(h, w), padded at the bottom and right with `fill`
    (Probe3D pads SPair images so, with white), so that a keypoint keeps its pixel coordinates."""
    h, w = image.shape[:2]
    s = max(h, w)
    return np.pad(image, ((0, s - h), (0, s - w), (0, 0)), constant_values=fill)


SPAIR_PER_CLASS = 200  # Probe3D draws 200 test pairs per class (seed 20); 0 = every pair
SPAIR_SEED = 20


def read_spair(root, split="test", per_class=SPAIR_PER_CLASS, seed=SPAIR_SEED):
    """SPair-71k as distributed: ROOT/PairAnnotation/{trn,val,test}/*.json, one pair each (category,
    src_imname, trg_imname, src_kps and trg_kps: the keypoints both images show, [x, y] pixels in
    the same order, trg_bndbox: the target object's box x0, y0, x1, y1), images at
    ROOT/JPEGImages/CATEGORY/NAME. Per class, the sorted pair files are shuffled with `seed` and the
    first `per_class` kept (Probe3D's subsample; its own order comes from an unsorted glob). Returns
    a list of dicts: category, src, trg (paths), src_kps, trg_kps ((K, 2) float arrays), trg_box,
    src_side, trg_side (the longer image side, by which Probe3D's square padding scales points)."""
    flag = "--spair"
    files = sorted(glob.glob(os.path.join(root, "PairAnnotation", split, "*.json")))
    if not files:
        raise BenchmarkError(f"{flag} {root}: no pair annotations PairAnnotation/{split}/*.json (SPair-71k layout)")
    by_class = {}
    for f in files:
        a = read_json(f, flag)
        try:
            cat = a["category"]
            pair = {"category": cat, "src": os.path.join(root, "JPEGImages", cat, a["src_imname"]),
                    "trg": os.path.join(root, "JPEGImages", cat, a["trg_imname"]),
                    "src_kps": np.asarray(a["src_kps"], np.float64).reshape(-1, 2),
                    "trg_kps": np.asarray(a["trg_kps"], np.float64).reshape(-1, 2),
                    "trg_box": [float(v) for v in a["trg_bndbox"]]}
        except (KeyError, TypeError, ValueError) as e:
            raise BenchmarkError(f"{flag}: {f} is not an SPair pair annotation ({type(e).__name__}: {e})") from None
        if len(pair["src_kps"]) != len(pair["trg_kps"]) or len(pair["trg_box"]) != 4:
            raise BenchmarkError(f"{flag}: {f} has unequal src_kps and trg_kps or a box without 4 numbers")
        by_class.setdefault(cat, []).append(pair)
    pairs = []
    for cat in sorted(by_class):
        chosen = by_class[cat]
        if per_class:
            order = np.random.default_rng(seed).permutation(len(chosen))[:per_class]
            chosen = [chosen[i] for i in sorted(order)]
        pairs += chosen
    need_files(images := sorted({p[k] for p in pairs for k in ("src", "trg")}), flag, "images listed in PairAnnotation are")
    need_decodable(images, flag)
    sides = {}
    for p in pairs:
        for k in ("src", "trg"):
            if p[k] not in sides:
                with Image.open(p[k]) as im:
                    sides[p[k]] = max(im.size)
            p[k + "_side"] = sides[p[k]]
    return pairs


def read_coco_karpathy(root, karpathy=None):
    """COCO retrieval's 5k test images: Karpathy's dataset_coco.json (ROOT/dataset_coco.json or the
    file given) lists every image with its split and sentences; the 5,000 of split "test" and all
    their captions (5 or more each) are the benchmark. Images at ROOT/<filepath>/<filename>
    (val2014/COCO_val2014_*.jpg as distributed). Returns (image paths, captions, owner) with
    owner[j] the image of caption j."""
    flag = "--coco"
    path = karpathy or os.path.join(root, "dataset_coco.json")
    spec = read_json(path, flag)
    try:
        test = [im for im in spec["images"] if im["split"] == "test"]
        files = [os.path.join(root, im.get("filepath", ""), im["filename"]) for im in test]
        captions, owner = [], []
        for i, im in enumerate(test):
            for sent in im["sentences"]:
                captions.append(sent["raw"])
                owner.append(i)
    except (KeyError, TypeError) as e:
        raise BenchmarkError(f"{flag}: {path} is not Karpathy's dataset_coco.json ({type(e).__name__}: {e})") from None
    if not test:
        raise BenchmarkError(f"{flag}: {path} lists no image of split 'test'")
    need_files(files, flag, "test images of dataset_coco.json are")
    need_decodable(files, flag)
    return files, captions, owner


def read_nyu_eigen(root):
    """NYUv2 in the layout of BTS, AdaBins, ZoeDepth and Depth Anything's metric-depth code (made by
    BTS's extract_official_train_test_set_from_mat.py): ROOT/official_splits/{train,test}/SCENE/
    rgb_NNNNN.jpg with sync_depth_NNNNN.png (16-bit millimetres, 0 = no depth); test holds Eigen's
    654 images, train the 795 official training images. Returns {split: [(image, depth), ...]}."""
    flag, out = "--nyu", {}
    for split in ("train", "test"):
        images = sorted(glob.glob(os.path.join(root, "official_splits", split, "*", "rgb_*.jpg")))
        if not images:
            raise BenchmarkError(f"{flag} {root}: no official_splits/{split}/SCENE/rgb_*.jpg (BTS's NYUv2 layout)")
        depths = [os.path.join(os.path.dirname(f), "sync_depth_" + os.path.basename(f)[4:-4] + ".png") for f in images]
        need_files(depths, flag, f"depth maps sync_depth_*.png of official_splits/{split} are")
        need_decodable(images + depths, flag)
        out[split] = list(zip(images, depths))
    return out


def read_depth_png(path, scale=1000.0):
    """16-bit PNG depth -> float32 metres (0 stays 0: no measurement)."""
    return read_png(path).astype(np.float32) / scale


def read_ade(root):
    """ADE20K as distributed for the scene-parsing benchmark (ADEChallengeData2016):
    ROOT/images/{training,validation}/NAME.jpg with ROOT/annotations/{...}/NAME.png (8-bit, 0 =
    other / not labelled, 1..150 the classes). Returns {"train": [(image, label)], "val": [...]}."""
    flag, out = "--ade", {}
    for split, folder in (("train", "training"), ("val", "validation")):
        images = sorted(glob.glob(os.path.join(root, "images", folder, "*.jpg")))
        if not images:
            raise BenchmarkError(f"{flag} {root}: no images/{folder}/*.jpg (ADEChallengeData2016 layout)")
        labels = [os.path.join(root, "annotations", folder, os.path.basename(f)[:-4] + ".png") for f in images]
        need_files(labels, flag, f"annotations/{folder}/*.png of the images are")
        need_decodable(images + labels, flag)
        out[split] = list(zip(images, labels))
    return out


# KITTI's Eigen test list and folders as the references lay them out: BTS (eigen_test_files_with_gt.txt,
# the raw drives at the root), ZoeDepth / Depth Anything (kitti_eigen_test_files_with_gt.txt, raw/ or
# raw_data/, annotated depth in data_depth_annotated/ or data_depth_annotated_zoedepth/, whose lists
# may hold absolute paths of the machine that wrote them). The annotated depth as KITTI ships it has
# train/ and val/ inside; BTS merges them, and either way is read.
KITTI_LISTS = ("kitti_eigen_test_files_with_gt.txt", "eigen_test_files_with_gt.txt")
KITTI_LIST = KITTI_LISTS[0]
KITTI_RAW = ("raw", "raw_data", "")
KITTI_GT = tuple(os.path.join(a, b) for a in ("data_depth_annotated", "data_depth_annotated_zoedepth")
                 for b in ("", "train", "val"))
KITTI_IMAGE = re.compile(r"(?:^|/)(\d{4}_\d{2}_\d{2}/\d{4}_\d{2}_\d{2}_drive_\d{4}_sync/.+)$")  # DATE/DRIVE/image_02/data/N.png
KITTI_DEPTH = re.compile(r"(?:^|/)(\d{4}_\d{2}_\d{2}_drive_\d{4}_sync/.+)$")  # DRIVE/proj_depth/groundtruth/...


def kitti_file(root, field, pattern, folders):
    """The file a list entry names, in the first of ROOT/FOLDER that holds it (None if none does)."""
    m = pattern.search(field)
    rel = m.group(1) if m else field.lstrip("/")
    return next((p for f in folders if os.path.isfile(p := os.path.join(root, f, rel))), None)


def read_kitti_eigen(root, list_file=None):
    """KITTI's Eigen test split with the annotated depth: the list ("IMAGE GT [FOCAL]" per line, GT
    "None" where the annotated depth lacks the frame: 652 of 697 lines have one) is ROOT/
    kitti_eigen_test_files_with_gt.txt (ZoeDepth, Depth Anything) or ROOT/eigen_test_files_with_gt.txt
    (BTS), or the file given; images (KITTI raw: DATE/DRIVE/image_02/data/N.png) under ROOT/raw/,
    ROOT/raw_data/ or ROOT itself; depth (DRIVE/proj_depth/groundtruth/image_02/N.png, 16-bit,
    metres x 256, 0 = none) under ROOT/data_depth_annotated/ or ROOT/data_depth_annotated_zoedepth/,
    with or without KITTI's train/ and val/ level. Returns [(image, depth), ...]."""
    flag = "--kitti"
    path = list_file or next((p for name in KITTI_LISTS if os.path.isfile(p := os.path.join(root, name))), None)
    if path is None or not os.path.isfile(path):
        raise BenchmarkError(f"{flag} {root}: no {list_file or ' or '.join(KITTI_LISTS)} (the Eigen test list of "
                             "Depth Anything / BTS)")
    pairs, missing = [], []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2 or parts[1] == "None":
                continue
            image, depth = kitti_file(root, parts[0], KITTI_IMAGE, KITTI_RAW), kitti_file(root, parts[1], KITTI_DEPTH, KITTI_GT)
            if image is None or depth is None:
                missing.append(parts[0] if image is None else parts[1])
            else:
                pairs.append((image, depth))
    if missing:
        raise BenchmarkError(f"{flag}: {len(missing)} images or depth maps of {path} are missing under "
                             f"{root} (raw/, raw_data/ or the root; data_depth_annotated[_zoedepth]/), "
                             f"e.g. {missing[0]}")
    if not pairs:
        raise BenchmarkError(f"{flag}: {path} lists no image with ground truth")
    need_decodable([p for pair in pairs for p in pair], flag)
    return pairs


NAVI_MAX_ANGLE = 120.0  # degrees: Probe3D pairs a photo with one whose view differs by at most this
NAVI_EVERY = 4  # Probe3D keeps every 4th photo as a pair's first image
NAVI_SEED = 8
NAVI_SAME_VIEW = 1e-3  # degrees: two photos this close in rotation show the same view (float rounding of equal poses)


def quaternion_matrix(q):
    """(w, x, y, z) quaternion, NAVI's camera rotation -> (3, 3) rotation matrix."""
    w, x, y, z = np.asarray(q, np.float64)
    s = 2.0 / (w * w + x * x + y * y + z * z)
    return np.array([[1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
                     [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
                     [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)]])


def navi_photos(folder, flag):
    """One NAVI collection: {photo id: image, depth, focal, size (original h, w), pose ((4, 4)
    object-to-camera, metres)}, with Probe3D's downsampled_ID copies where its resize script made them."""
    notes = read_json(os.path.join(folder, "annotations.json"), flag)
    try:
        notes = {os.path.splitext(a["filename"])[0]: a for a in notes}
        photos = {}
        for f in sorted(os.listdir(os.path.join(folder, "images"))):
            pid, ext = os.path.splitext(f)
            if ext.lower() != ".jpg" or "_" in pid or pid not in notes:  # "_": the downsampled copies
                continue
            a, small = notes[pid], os.path.join(folder, "images", "downsampled_" + f)
            pose = np.eye(4)
            pose[:3, :3], pose[:3, 3] = quaternion_matrix(a["camera"]["q"]), np.asarray(a["camera"]["t"]) / 1000.0
            prefix = "downsampled_" * os.path.isfile(small)
            photos[pid] = {"image": os.path.join(folder, "images", prefix + f),
                           "depth": os.path.join(folder, "depth", prefix + pid + ".png"),
                           "focal": float(a["camera"]["focal_length"]), "size": tuple(a["image_size"]), "pose": pose}
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise BenchmarkError(f"{flag}: {folder} is not a NAVI collection ({type(e).__name__}: {e})") from None
    need_files([p["depth"] for p in photos.values()], flag, f"depth maps of {folder} are")
    need_decodable([p[k] for p in photos.values() for k in ("image", "depth")], flag)
    return photos


def read_navi(root, max_angle=NAVI_MAX_ANGLE, every=NAVI_EVERY, seed=NAVI_SEED):
    """NAVI v1 as distributed: ROOT/OBJECT/wild_set/ (and the object's multiview_* folders) with
    images/ID.jpg, depth/ID.png (16-bit) and annotations.json (per photo: filename, image_size [h, w],
    camera {q (w, x, y, z), t (mm), focal_length (px)}: the object-to-camera pose). Probe3D's test
    pairs: the wild-set photos of every object that also has a multiview_* collection, each paired
    with another photo of the same object whose camera rotation differs by more than NAVI_SAME_VIEW
    (0.001 degrees: equal up to rounding) and at most max_angle degrees, drawn uniformly (seeded;
    Probe3D's draw follows an unsorted directory listing), photos without such a partner left out,
    and every `every`-th photo in (object, id) order kept as a first image. Returns [(photo, photo)]."""
    flag = "--navi"
    objects = sorted(d for d in glob.glob(os.path.join(root, "*", "wild_set")) if os.path.isdir(d))
    if not objects:
        raise BenchmarkError(f"{flag} {root}: no OBJECT/wild_set/ folders (NAVI v1 layout)")
    g, firsts = torch.Generator().manual_seed(seed), []
    for folder in objects:
        if not glob.glob(os.path.join(os.path.dirname(folder), "multiview_*")):
            continue  # Probe3D skips objects whose only collection is the wild set (3d_scan/ is no collection)
        photos = list(navi_photos(folder, flag).values())
        if len(photos) < 2:
            continue
        R = np.stack([p["pose"][:3, :3] for p in photos])
        trace = np.einsum("aij,bij->ab", R, R)  # trace(Ra Rb^T)
        angle = np.degrees(np.arccos(np.clip((trace - 1) / 2, -1, 1)))
        # a photo is never its own partner, nor another with the same rotation: rounding leaves
        # equal rotations ~1e-6 degrees apart, which "more than 0" would let through
        np.fill_diagonal(angle, 0)
        for i, p in enumerate(photos):
            allowed = torch.from_numpy((angle[i] > NAVI_SAME_VIEW) & (angle[i] <= max_angle)).double()
            if allowed.sum() > 0:
                firsts.append((p, photos[int(torch.multinomial(allowed, 1, generator=g))]))
    if not firsts:
        raise BenchmarkError(f"{flag} {root}: no wild-set photo has a partner within {max_angle:g} degrees")
    return firsts[::every]

# -----------------------------------------------------------------------------
# Command line: write toy-world shards, or preview a shard

def generate(out, n, val_n=0, size=64, seed=0, shard_size=1000, captions="web", world="toy"):
    """Render n train and val_n validation scenes into DIR/{train,val}-NNNNNN.tar; returns paths."""
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    paths = []
    with tqdm(total=n + val_n, desc="rendering", unit="scene") as bar:
        for split, count, offset in (("train", n, 0), ("val", val_n, VAL_OFFSET)):
            for shard, start in enumerate(range(0, count, shard_size)):
                def samples(start=start, offset=offset, count=count):
                    for i in range(start + offset, min(start + shard_size, count) + offset):
                        yield f"{i - offset:09d}", scene_members(render_scene(seed, i, size, captions, world), seed, i)
                        bar.update()
                paths.append(os.path.join(out, f"{split}-{shard:06d}.tar"))
                write_shard(paths[-1], samples())
    return paths


def preview(shard, png, n=8):
    """A grid of the first n samples: true and pseudo boxes on separate panels, depth maps, the
    caption as title; the figure's title says which labels the shard holds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples = []
    for key, members in iter_tar(shard):
        try:
            samples.append(decode_sample(key, members))
        except BadSample as e:
            print(f"data: skipped sample {key}: {e}", file=sys.stderr)
        if len(samples) == n:
            break
    if not samples:
        _die(f"{shard} holds no readable samples")
    has = lambda key: any(key in s for s in samples)
    # Per sample a column of panels: the true boxes, the pseudo boxes (their own panel, with their
    # scores, so that an expert's misses, false positives and confused names can be seen), then
    # true and pseudo inverse depth; only the panels the shard has data for.
    panels = [p for p, key in (("truth", "gt"), ("pseudo", "ground"), ("gt_depth", "gt_depth"),
                               ("depth", "depth")) if has(key)] or ["image"]
    cols = min(4, len(samples))
    rows = math.ceil(len(samples) / cols) * len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def draw_boxes(ax, boxes, color, h, w):
        for (x0, y0, x1, y1), label in boxes:
            ax.add_patch(plt.Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h,
                                       fill=False, color=color, lw=1))
            ax.text(x0 * w, y0 * h - 1, label, color=color, fontsize=6, va="bottom",
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "lw": 0})

    for i, s in enumerate(samples):
        r, c = i // cols * len(panels), i % cols
        h, w = s["image"].shape[:2]
        for j, panel in enumerate(panels):
            ax = axes[r + j, c]
            if panel in ("truth", "pseudo", "image"):
                ax.imshow(s["image"])
            if panel == "truth" and "gt" in s:
                draw_boxes(ax, [(o["box"], o["name"]) for o in s["gt"]["objects"]], "lime", h, w)
                ax.set_title("true boxes", fontsize=7)
            if panel == "pseudo" and "ground" in s:
                draw_boxes(ax, [(e["box"], f"{e['name']} {e.get('score', 1):.2f}") for e in s["ground"]["entities"]],
                           "orange", h, w)
                ax.set_title(f"pseudo boxes ({s['ground'].get('expert', '?')}), with scores", fontsize=7)
            if panel == "gt_depth" and "gt_depth" in s:
                ax.imshow(1 / s["gt_depth"], cmap="magma")     # inverse depth: near is bright, sky is 0
                ax.set_title("true inverse depth", fontsize=7)
            if panel == "depth" and "depth" in s:
                ax.imshow(np.where(s["depth_valid"], s["depth"], np.nan), cmap="magma")
                ax.set_title("pseudo-label inverse depth", fontsize=7)
        axes[r, c].set_title("\n".join(textwrap.wrap(s["caption"], 42)) + "\n" + axes[r, c].get_title(), fontsize=7)
    held = [what for key, what in (("gt", "truth"), ("ground", "pseudo boxes"), ("depth", "pseudo depth"))
            if has(key)]
    fig.suptitle(f"{shard}: " + (", ".join(held) if held else "images and captions only (no labels)"), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _die(message):
    print(f"data.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):                                  # one clear line, not usage + traceback
        _die(message)


def main(argv=None):
    p = _Parser(description="Write toy-world shards, or preview a shard.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="directory for train-NNNNNN.tar and val-NNNNNN.tar (required to write)")
    p.add_argument("--n", type=int, help="number of training scenes (required to write)")
    p.add_argument("--val-n", type=int, default=0, help="number of validation scenes (disjoint scenes)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels, at least 32")
    p.add_argument("--seed", type=int, default=0, help="world seed: scene i is render_scene(seed, i)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--captions", choices=tuple(CAPTIONS), default="web",
                   help="web: alt-text that mentions some objects, often without or with wrong attributes; "
                        "full: every object's colour and shape (an ablation: text that says everything)")
    p.add_argument("--world", choices=tuple(WORLDS), default="toy",
                   help="toy: the toy world; shapes: one white object before a fixed room, light and camera "
                        "(scenes differ by shape, size, place and turn only: a positive control for ssl)")
    p.add_argument("--preview", metavar="SHARD", help="draw the first 8 samples of this shard ...")
    p.add_argument("--png", help="... into this PNG file")
    args = p.parse_args(argv)
    if args.preview is not None:
        if not args.png:
            _die("--preview needs --png FILE to write the picture to")
        if not os.path.isfile(args.preview):
            _die(f"--preview {args.preview} is not a file")
        preview(args.preview, args.png)
        print(f"wrote {args.png}")
        return
    if args.out is None or args.n is None:
        _die("give --out DIR and --n N to write shards, or --preview SHARD --png FILE")
    for flag, value, low in (("--n", args.n, 1), ("--val-n", args.val_n, 0), ("--size", args.size, 32),
                             ("--shard-size", args.shard_size, 1)):
        if value < low:
            _die(f"{flag} must be at least {low}, not {value}")
    paths = generate(args.out, args.n, args.val_n, args.size, args.seed, args.shard_size, args.captions, args.world)
    for split, count in (("train", args.n), ("val", args.val_n)):
        mine = [q for q in paths if os.path.basename(q).startswith(split)]
        if mine:
            mb = sum(os.path.getsize(q) for q in mine) / 2 ** 20
            last = f" ... {os.path.basename(mine[-1])}" if len(mine) > 1 else ""
            print(f"wrote {count} {split} scenes ({args.size} px, seed {args.seed}, {args.captions} captions) to {mine[0]}{last} "
                  f"({len(mine)} shard(s), {mb:.1f} MB)")


if __name__ == "__main__":
    main()
