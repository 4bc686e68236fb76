"""``report.html``: one self-contained page per study folder — the answer first, the tables, the figures, a heat-map
browser.

No server and no network: the CSS and script are inline, the figures are PNG data URIs, the browser's maps are inline
JSON. The merge writes the page with its tables and figures (``files.Staged``: it replaces the old one only when every
output is written); ``attnprobe report DIR`` (``rewrite_page``) writes it again from a folder's cells and tables.

The heat-map browser shows, over each generation's image, the requested mention's attention for a concept × row
(variant or intervention) × seed, at every site and denoiser call together, one site over every call, one call over
every site, or one site at one call (``measure.browser_maps``: the cell keeps ``[site, h, w]``, ``[call, h, w]`` and
``[site, call, h', w']``; the last embedded up to ``JOINT_BUDGET`` values per page). Each map is quantised to uint8
between its own min and max (the page says both), so the page grows by about ``((sites + calls) × h × w + sites ×
calls × h' × w') × 4/3`` bytes per generated image (h, w ≤ 32; h', w' ≤ 12), plus its thumbnail (≤ 128 px PNG); tables
of more than ``MAX_ROWS`` rows show their first rows and link to the CSV beside the page. Cells of older runs (no
per-site maps) show their image and mean map only.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .._atomic import write_atomic
from ..errors import ConfigError, StoreError
from ..models.loader import TINY_MODELS
from .cells import Cell, collect, settings_key
from .contrasts import MEASURES
from .files import writing
from .lock import FolderLock
from .report import SHAPES_NOTE, answer_lines, video_lines

__all__ = ["PAGE", "MAX_ROWS", "page_html", "write_page", "rewrite_page", "browser_data"]

#: The page's name in a study folder.
PAGE = "report.html"

#: Tables longer than this show their first ``MAX_ROWS`` rows on the page, with a link to the whole CSV.
MAX_ROWS = 200

#: The figures in the order the page shows them, with a line on each.
FIGURES = {
    "contrasts.png": "The answer as a forest plot: per concept and contrast, the paired mean difference (95% interval, Holm's p).",
    "where_when.png": "Where and when: Δ attention on the requested mention per site (execution order) and denoiser call.",
    "trajectories.png": "Attention on the requested mention per denoiser call (mean over seeds, band: min–max).",
    "delta_auc.png": "Δ AUC vs the baseline per concept and row, with 95% intervals.",
    "presence.png": "Δ presence against Δ attention AUC per concept and row.",
    "heatmaps.png": "Where each row's attention lands on its image (each concept's first seed; each panel min–max scaled; "
                    "a video's: the mean over latent frames, over its middle decoded frame).",
    "frames.png": "A video's attention per latent frame (each concept's first seed; each strip min–max scaled over its "
                  "frames), over the decoded frame in the middle of those each latent frame makes.",
    "text_similarity.png": "The text encoder's side: the requested mention's cosine to the baseline's, per layer.",
}

#: The tables after the answer: shown whole (summary, contrasts) or folded.
TABLES = ("summary.csv", "contrasts.csv", "auc.csv", "where_when.csv", "text_similarity.csv", "trajectories.csv",
          "failures.csv")


def _rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def _number(text):
    """A CSV cell as a float where it is one (``n`` as an int), else the text."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _contrasts(rows: list[dict]) -> list[dict]:
    return [{k: _number(v) for k, v in r.items()} for r in rows]


def _fmt(text: str) -> str:
    value = _number(text)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(rows: list[dict], name: str, limit: int | None = None) -> str:
    if not rows:
        return f"<p class=note>{html.escape(name)}: no rows.</p>"
    cols = list(rows[0])
    shown = rows if limit is None else rows[:limit]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>" for r in shown)
    more = (f"<p class=note>The first {len(shown)} of {len(rows)} rows; the whole table: "
            f"<a href=\"{html.escape(name)}\">{html.escape(name)}</a> (beside this page).</p>") if len(shown) < len(rows) else ""
    return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}"


def _answer_table(rows: list[dict]) -> str:
    """The contrasts as a reader takes them in: per concept, row − reference, measure, mean [95% CI], p, Holm p."""
    several = len({r["model"] for r in rows}) > 1
    out = []
    for r in rows:
        mean, lo, hi = (_number(r[k]) for k in ("mean", "ci_low", "ci_high"))
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi))
        verdict = ("lower" if finite and hi < 0 else "higher" if finite and lo > 0 else "no clear change")
        ci = f"[{lo:+.4f}, {hi:+.4f}]" if finite else "n/a"
        cells = ([r["model"]] if several else []) + [
            r["concept"], f"{r['variant']} − {r['reference']}", MEASURES.get(r["measure"], r["measure"]), str(r["n"]),
            f"{mean:+.4f}" if isinstance(mean, (int, float)) and math.isfinite(mean) else "n/a", ci, _fmt(r["p_value"]),
            _fmt(r["p_holm"]), verdict]
        cls = {"lower": "neg", "higher": "pos"}.get(verdict, "")
        out.append(f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = (["model"] if several else []) + ["concept", "contrast", "measure", "seeds", "mean difference", "95% CI",
                                             "p", "Holm p", "direction (t-interval)"]
    return ("<div class=scroll><table class=answer><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(out) + "</tbody></table></div>")


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _quantised(maps: torch.Tensor) -> dict:
    """``[n, h, w]`` maps as uint8 between each map's own min and max: ``{"shape", "min", "max", "q"}`` (base64)."""
    a = maps.float().numpy().astype(np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = a.min(axis=(1, 2)), a.max(axis=(1, 2))
    span = np.where(hi > lo, hi - lo, 1.0)
    q = np.rint((a - lo[:, None, None]) / span[:, None, None] * 255).clip(0, 255).astype(np.uint8)
    return {"shape": list(a.shape), "min": lo.tolist(), "max": hi.tolist(), "q": base64.b64encode(q.tobytes()).decode()}


#: the most values of one-site-at-one-call maps a page embeds (about 5 MB of base64); past it, the browser shows each
#: site over all calls and each call over all sites, and says so
JOINT_BUDGET = 4_000_000
#: the most pixels of a video's per-latent-frame images a page embeds (all cells together, about 2 MB of PNG at most);
#: past it, the browser draws a latent frame's map without its frame, and says so
FRAME_BUDGET = 1_000_000


def _png(array: np.ndarray) -> str:
    """An ``[h, w, 3]`` uint8 image as a PNG data URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return _png_uri(buf.getvalue())


def browser_data(browser: list[dict], side: int = 32) -> list[dict]:
    """The heat-map browser's data (JSON-ready) from ``collect``'s ``result.browser`` entries: per generation, each row's
    thumbnail (PNG data URI) and quantised maps (``sites``: ``[site, h, w]``, ``calls``: ``[call, h, w]``; a cell of
    an older run: ``mean`` only, its ``map`` shrunk to ``side`` pixels on its longer side); a video's also ``frames``
    (``[qt, h, w]``, per latent frame) and ``frame_images`` (per latent frame a PNG data URI, up to ``FRAME_BUDGET``
    pixels per page, else ``None``), with the cell's ``video`` record (``attnprobe.study.video.frame_record``)."""
    cells = []
    joint_budget = JOINT_BUDGET  # values of the site × call maps the page takes, all cells together
    frame_budget = FRAME_BUDGET  # pixels of the per-latent-frame images, all cells together
    for entry in browser:
        t = entry["tensors"]
        rows = []
        for k, name in enumerate(entry["rows"]):
            row = {"name": name}
            if f"image.{k}" in t:
                row["image"] = _png(t[f"image.{k}"].numpy())
            if f"framemaps.{k}" in t:  # a video: per latent frame, its map and the decoded frame it is drawn over
                row["frames"] = _quantised(t[f"framemaps.{k}"])
                stills = t.get(f"frameimages.{k}")
                if stills is not None:
                    frame_budget -= stills.shape[0] * stills.shape[1] * stills.shape[2]
                    row["frame_images"] = [_png(f) for f in stills.numpy()] if frame_budget >= 0 else None
            if f"sitemaps.{k}" in t and f"callmaps.{k}" in t:
                row["sites"], row["calls"] = _quantised(t[f"sitemaps.{k}"]), _quantised(t[f"callmaps.{k}"])
                row["mean"] = _quantised(t[f"sitemaps.{k}"].float().mean(0, keepdim=True))
                if f"sitecalls.{k}" in t and joint_budget > 0:  # one site at one call: [site × call, h, w]
                    joint = t[f"sitecalls.{k}"]
                    joint_budget -= joint.numel()
                    row["joint"] = _quantised(joint.flatten(0, 1)) if joint_budget >= 0 else None
            elif f"map.{k}" in t:
                m = t[f"map.{k}"].float()[None, None]
                scale = min(1.0, side / max(m.shape[-2:]))
                shape = (max(1, round(m.shape[-2] * scale)), max(1, round(m.shape[-1] * scale)))
                row["mean"] = _quantised(torch.nn.functional.interpolate(m, size=shape, mode="bilinear",
                                                                         antialias=scale < 1)[0])
            rows.append(row)
        has_sites = all("sites" in r for r in rows)
        cells.append(dict(model=entry["model"], concept=entry["concept"], seed=entry["seed"], rows=rows,
                          video=entry.get("video") if all("frames" in r for r in rows) else None,
                          sites=entry["sites"] if has_sites else [], timesteps=entry["timesteps"] if has_sites else []))
    return cells


def page_html(files: dict[str, bytes], browser: list[dict], settings: dict | None = None) -> str:
    """The page: ``files`` {path relative to the folder: bytes} holds the tables and figures (PNGs of several models
    under ``figures/<model>/``), ``browser`` ``collect``'s entries, ``settings`` study.json's."""
    tables = {name: _rows(files[name]) for name in TABLES if name in files}
    contrasts = _contrasts(tables.get("contrasts.csv", []))
    models = list(dict.fromkeys(r["model"] for r in tables.get("summary.csv", [])))
    settings = settings or {}
    shown = {k: settings[k] for k in ("steps", "guidance", "size", "frames", "scorer") if settings.get(k) is not None}
    meta = ", ".join([f"model{'s' * (len(models) > 1)} {', '.join(models) or '?'}"]
                     + [f"{k} {v}" for k, v in shown.items()] + [f"rows {', '.join(settings.get('variants') or {})}"])
    parts = [f"<h1>attnprobe study</h1><p class=meta>{html.escape(meta)}</p>"]
    if any(m in TINY_MODELS for m in models):
        parts.append("<p class=warn>Random weights (" + html.escape(", ".join(m for m in models if m in TINY_MODELS))
                     + "): these numbers test the plumbing, not the question. Run --model shapes, or a real model.</p>")
    if "shapes" in models:
        parts.append(f"<p class=note>{html.escape(SHAPES_NOTE)}</p>")
    videos = {c["model"]: c["video"] for c in reversed(browser) if c.get("video")}
    if videos:
        scored = bool(settings.get("scorer")) and settings.get("scorer") != "none"
        parts.append("<p class=note>" + html.escape(" ".join(video_lines(videos, scored))) + "</p>")
    parts.append("<section id=answer><h2>The answer</h2><p class=q>Does an unlearning instruction lower the denoiser's "
                 "attention to the concept beyond naming it twice? Each contrast is row − reference of the same seed "
                 "(e.g. instruction − repetition), on each row's Δ against the baseline of that seed; green: its 95% "
                 "t-interval below 0, red: above 0 (the direction; the exact test and Holm's p decide).</p>")
    lines = answer_lines(contrasts)
    if lines:
        parts.append("<pre class=lines>" + html.escape("\n".join(lines).strip()) + "</pre>")
        parts.append(_answer_table(tables["contrasts.csv"]))
    else:
        parts.append("<p class=note>No contrasts: the study needs a repetition or instruction row and finished "
                     "generations (contrasts.csv).</p>")
    parts.append("</section><nav><a href='#tables'>Tables</a> · <a href='#figures'>Figures</a> · "
                 "<a href='#browser'>Heat-map browser</a></nav>")
    parts.append("<section id=tables><h2>Tables</h2>")
    for name in TABLES:
        if name not in tables:
            continue
        whole = name in ("summary.csv", "contrasts.csv")
        body = _table(tables[name], name, None if whole else MAX_ROWS)
        title = f"{html.escape(name)} ({len(tables[name])} rows)"
        parts.append(f"<h3>{title}</h3>{body}" if whole else f"<details><summary>{title}</summary>{body}</details>")
    parts.append("</section><section id=figures><h2>Figures</h2>")
    pngs = sorted((p for p in files if p.endswith(".png")),
                  key=lambda p: (p.count("/"), p.rsplit("/", 1)[0] if "/" in p else "",
                                 list(FIGURES).index(p.rsplit("/", 1)[-1]) if p.rsplit("/", 1)[-1] in FIGURES else 99, p))
    for path in pngs:
        caption = FIGURES.get(path.rsplit("/", 1)[-1], "")
        parts.append(f"<figure><img alt='{html.escape(path)}' src='{_png_uri(files[path])}'>"
                     f"<figcaption><b>{html.escape(path)}</b> {html.escape(caption)}</figcaption></figure>")
    parts.append("</section>")
    data = json.dumps({"cells": browser_data(browser)}, allow_nan=False).replace("</", "<\\/")
    parts.append(_BROWSER.replace("__DATA__", data))
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>attnprobe study: {html.escape(', '.join(models))}"
            f"</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_page(out, files: dict, browser: list[dict], write=write_atomic) -> Path:
    """Write ``out/report.html`` (``write(path, bytes)``: ``write_atomic``, or the merge's ``Staged.write``) from
    ``files`` {path: bytes} (absolute or relative to ``out``) and ``collect``'s browser entries; returns its path."""
    out = Path(out)
    root = out.absolute()  # a relative out (make study's out/study) and the merge's paths under it, made comparable
    rel = {(Path(p).absolute().relative_to(root) if Path(p).is_absolute() or root in Path(p).absolute().parents
            else Path(p)).as_posix(): d for p, d in files.items()}
    try:
        settings = json.loads((out / "study.json").read_text())
    except (OSError, ValueError):
        settings = {}
    return write(out / PAGE, page_html(rel, browser, settings if isinstance(settings, dict) else {}).encode())


def rewrite_page(out) -> Path:
    """``attnprobe report DIR``: write ``DIR/report.html`` again from the folder's tables, figures and cells (nothing
    generated, nothing else written), holding the folder's lock.

    Raises:
        ConfigError: ``out`` is not a folder, holds no study (no study.json), or its study.json cannot be read; another
            run holds the folder. StoreIOError: the page cannot be written.
    """
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"{str(out)!r} is not a folder: give a study's folder (the --out of attnprobe study)")
    try:
        settings = json.loads((out / "study.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{str(out)!r} holds no study (no study.json): give the --out folder of attnprobe study") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(out)!r}: its study.json cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{str(out)!r}: its study.json is not a table of settings")
    files = {}
    for path in [out / n for n in TABLES] + sorted(out.glob("*.png")) + sorted(out.glob("figures/*/*.png")):
        if path.is_file():
            with writing(path, "cannot be read"):
                files[path.relative_to(out).as_posix()] = path.read_bytes()
    cells = list(dict.fromkeys(Cell(r["model"], r["concept"], int(r["seed"]))
                               for r in _rows(files.get("auc.csv", b""))))
    result = SimpleNamespace(failures=[], failed=0, text=[], done=0, partial=0, trajectories=[], aucs=[],
                             where_when_data={}, browser=[])
    key = settings_key({k: v for k, v in settings.items() if k != "attnprobe"})
    with FolderLock(out):
        try:
            collect(out, cells, sorted({c.seed for c in cells}), result, settings=key)
        except StoreError as exc:
            raise ConfigError(f"{str(out)!r}: its cells cannot be read ({exc})") from None
        with writing(out / PAGE):
            return write_page(out, files, result.browser)


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:12px 20px;color:#1d1d1f}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:26px}
h3{font-size:15px;margin:14px 0 4px}.meta{color:#555;margin:0 0 6px}.warn{color:#b00020;font-weight:bold}
.q{margin:4px 0 6px}.note{color:#666;font-size:13px}pre.lines{background:#f5f7fa;border:1px solid #e0e4ea;padding:8px 10px;
white-space:pre-wrap;font-size:13px;margin:6px 0}nav{margin:14px 0;font-size:14px}
.scroll{overflow-x:auto;max-height:520px;overflow-y:auto}table{border-collapse:collapse;font-size:12.5px}
th,td{border:1px solid #e2e2e2;padding:2px 6px;text-align:right;white-space:nowrap}th{background:#f0f2f5;position:sticky;top:0}
td:first-child,th:first-child{text-align:left}table.answer{font-size:13.5px}tr.neg td{background:#e6f4ea}tr.pos td{background:#fdecea}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}figure{margin:14px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#444}#browser .controls label{margin-right:12px;font-size:14px;display:inline-block}
#browser select{font-size:14px;max-width:260px}#hm{border:1px solid #ccc;image-rendering:auto;margin-top:8px}
#bar{height:12px;width:256px;border:1px solid #ccc;vertical-align:middle}
"""

_BROWSER = """<section id=browser><h2>Heat-map browser</h2>
<p class=note>Left: the generated image; right: the requested mention's attention over it: every site and denoiser call together, one site
over every call, one call over every site, or one site at one call (smaller maps, kept within a page budget). Each map is scaled to its own min–max
(below), to show where, not how much. A video: its middle decoded frame under the maps averaged over latent frames, or (frame) one latent
frame's map over every site and call, over the decoded frame in the middle of those it makes.</p>
<div class=controls><label>concept <select id=c></select></label><label>row <select id=v></select></label>
<label>seed <select id=s></select></label><label>site <select id=site></select></label>
<label>call <select id=call></select></label><label id=framelabel>frame <select id=frame></select></label><label>map opacity <input id=op type=range min=0 max=100 value=60></label></div>
<canvas id=hm width=776 height=384></canvas>
<p id=info class=note></p><p class=note>low <canvas id=bar width=256 height=1></canvas> high</p></section>
<script>
"use strict";
const DATA = __DATA__;
const $ = id => document.getElementById(id);
function lut(t){const c=[[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];const x=t*(c.length-1),i=Math.min(Math.floor(x),c.length-2),f=x-i;
 return c[i].map((a,j)=>Math.round(a+(c[i+1][j]-a)*f));}
function fill(sel, items){sel.innerHTML="";for(const [val,text] of items){const o=document.createElement("option");o.value=val;o.textContent=text;sel.appendChild(o);}}
function decode(m){if(!m.bytes){const b=atob(m.q),a=new Uint8Array(b.length);for(let i=0;i<b.length;i++)a[i]=b.charCodeAt(i);m.bytes=a;}return m.bytes;}
const cells=DATA.cells, several=new Set(cells.map(c=>c.model)).size>1;
const keyOf=c=>(several?c.model+": ":"")+c.concept;
function current(){return cells.filter(c=>keyOf(c)===$("c").value&&String(c.seed)===$("s").value)[0];}
function setup(){
 if(!cells.length){$("info").textContent="No finished generation to show.";["c","v","s","site","call"].forEach(i=>$(i).disabled=true);return;}
 fill($("c"),[...new Set(cells.map(keyOf))].map(k=>[k,k]));changedConcept();
}
function changedConcept(){const mine=cells.filter(c=>keyOf(c)===$("c").value);
 fill($("s"),mine.map(c=>[String(c.seed),String(c.seed)]));changedSeed();}
function changedSeed(){const c=current(),v=$("v").value;fill($("v"),c.rows.map(r=>[r.name,r.name]));
 if(c.rows.some(r=>r.name===v))$("v").value=v;const site=$("site").value,call=$("call").value;
 fill($("site"),[["all","all sites"]].concat(c.sites.map((n,i)=>[String(i),i+": "+n])));
 fill($("call"),[["all","all calls"]].concat(c.timesteps.map((t,i)=>[String(i),"call "+i+" (t="+(+t).toFixed(0)+")"])));
 if([...$("site").options].some(o=>o.value===site))$("site").value=site;
 if([...$("call").options].some(o=>o.value===call))$("call").value=call;
 $("site").disabled=$("call").disabled=!c.sites.length;
 const fr=$("frame").value,v2=c.video;$("framelabel").style.display=v2?"":"none";
 fill($("frame"),[["all","mean over frames"]].concat(v2?(c.rows[0].frames?c.rows[0].frames.min:[]).map((_,t)=>{const sp=(v2.spans||[])[t];
  return [String(t),"latent "+t+(sp?(sp[0]===sp[1]?" (frame "+sp[0]+")":" (frames "+sp[0]+"–"+sp[1]+")"):"")];}):[]));
 if([...$("frame").options].some(o=>o.value===fr))$("frame").value=fr;draw();}
let drawing=0;
function draw(){const token=++drawing,c=current(),row=c.rows.find(r=>r.name===$("v").value)||c.rows[0];
 const site=$("site").value,call=$("call").value,fr=c.video&&row.frames?$("frame").value:"all";let m=row.mean,i=0,what="all sites, all calls";
 let src=row.image;if(c.video)what+=", mean over latent frames, over the middle decoded frame (frame "+c.video.shown+" of "+c.video.frames+")";
 if(site!=="all"&&call!=="all"){m=row.joint;i=(+site)*c.timesteps.length+(+call);what="site "+c.sites[+site]+", call "+call+
  (m?"":" (not kept: the page's budget for one-site-one-call maps is spent; choose all sites or all calls)");}
 else if(site!=="all"&&row.sites){m=row.sites;i=+site;what="site "+c.sites[i]+", mean over calls";}
 else if(call!=="all"&&row.calls){m=row.calls;i=+call;what="call "+i+", mean over sites";}
 if(fr!=="all"){m=row.frames;i=+fr;src=row.frame_images?row.frame_images[i]:null;const sp=(c.video.spans||[])[i];
  what="latent frame "+i+(sp?" (decoded frames "+sp[0]+"–"+sp[1]+")":"")+", all sites, all calls (per-frame maps are kept over every site and call)"+
  (src?"":"; its frame's image is not on the page (the page's budget for frame images is spent, or the frames are unknown)");}
 const cv=$("hm"),ctx=cv.getContext("2d"),H=cv.height,W=H,X=cv.width-W;ctx.clearRect(0,0,cv.width,H);
 const finish=()=>{if(token!==drawing)return;if(!m){$("info").textContent="No map kept for this row: "+what+".";return;}
  const h=m.shape[1],w=m.shape[2],q=decode(m),off=document.createElement("canvas");off.width=w;off.height=h;
  const ox=off.getContext("2d"),img=ox.createImageData(w,h);
  for(let p=0;p<h*w;p++){const [r,g,b]=lut(q[i*h*w+p]/255);img.data.set([r,g,b,255],4*p);}
  ox.putImageData(img,0,0);ctx.globalAlpha=src?$("op").value/100:1;ctx.imageSmoothingEnabled=true;
  ctx.drawImage(off,X,0,W,H);ctx.globalAlpha=1;if(!src)ctx.drawImage(off,0,0,W,H);
  $("info").textContent=(several?c.model+", ":"")+c.concept+", "+row.name+", seed "+c.seed+": "+what+
   "; attention on the requested mention from "+m.min[i].toPrecision(3)+" (low) to "+m.max[i].toPrecision(3)+" (high)"+
   (c.sites.length?"":" (a cell of an older run: its image and mean map only)");
  cv.dataset.drawn=String(token);cv.dataset.shown=[c.concept,row.name,c.seed,site,call,fr].join("|");};
 if(src){const im=new Image();im.onload=()=>{if(token!==drawing)return;ctx.imageSmoothingEnabled=false;ctx.drawImage(im,0,0,W,H);ctx.drawImage(im,X,0,W,H);finish();};im.src=src;}
 else finish();}
$("c").onchange=changedConcept;$("s").onchange=changedSeed;$("v").onchange=draw;$("op").oninput=draw;
$("site").onchange=draw;
$("call").onchange=draw;
$("frame").onchange=draw;
(()=>{const b=$("bar").getContext("2d"),d=b.createImageData(256,1);for(let x=0;x<256;x++)d.data.set([...lut(x/255),255],4*x);b.putImageData(d,0,0);})();
setup();
</script>"""
