// The search page of serve.py: plain JS, no build step, no other origin. Every text from the
// server is set with textContent (never as HTML), so a query or a caption cannot run code.
// The address is the state: /?q=TEXT&k=N (a search), /?image=I (an image's captions),
// /?view=failures (the worst queries each way); each is a shareable link.
"use strict";

const $ = (id) => document.getElementById(id);
let health = null;

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "dataset") Object.assign(e.dataset, value);
    else e[key] = value;
  }
  for (const c of children) {
    if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function api(path) {
  const r = await fetch(path);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

const fmt = (s) => Number(s).toFixed(4);
const link = (href, text, cls) => el("a", {href: href, className: cls || ""}, text);
const imageLink = (i) => link("/?image=" + i + "&k=" + $("k").value,
                              "image " + i + ": its captions \u203a", "to-image");

function thumbnail(i, toCaptions) {
  const img = el("img", {src: "/api/image/" + i + "/file", alt: "image " + i, loading: "lazy",
                         title: toCaptions ? "its captions" : ""});
  if (toCaptions) img.addEventListener("click", () => {
    location.href = "/?image=" + i + "&k=" + $("k").value;
  });
  return img;
}

function captionList(captions) {
  return el("ul", {className: "caps"}, ...captions.map((c) => el("li", {}, c)));
}

function meta(r) {
  return el("div", {className: "meta"}, el("span", {className: "rank"}, "#" + r.rank),
            el("span", {}, "score " + fmt(r.score)),
            el("span", {className: "stage", title: "the stage that scored it"},
               r.stage || "exhaustive"));
}

function button(label, onclick) {
  const b = el("button", {type: "button"}, label);
  b.addEventListener("click", onclick);
  return b;
}

function done(what) {
  document.body.dataset.state = what;
}

async function showExplain(q, index, title) {
  const dialog = $("explain"), img = $("heatmap");
  img.removeAttribute("src");
  delete img.dataset.loaded;
  $("explain-title").textContent = title + " (loading the attention...)";
  if (!dialog.open) dialog.showModal();
  const r = await fetch("/api/explain?q=" + encodeURIComponent(q) + "&index=" + index);
  if (!r.ok) {
    $("explain-title").textContent = (await r.json()).error;
    return;
  }
  img.onload = () => { img.dataset.loaded = "1"; };
  img.src = URL.createObjectURL(await r.blob());
  $("explain-title").textContent = title;
}

async function search(q, k) {
  $("q").value = q;
  status("searching...");
  const t0 = performance.now();
  const res = await api("/api/search?q=" + encodeURIComponent(q) + "&k=" + k);
  const ms = Math.round(performance.now() - t0);
  const unknown = res.query.unknown.length ?
    "; not in the vocabulary: " + res.query.unknown.join(", ") : "";
  $("query").replaceChildren(el("p", {}, "\u201c", el("span", {id: "query-text"}, res.query.text),
                                  "\u201d: " + res.query.n_words + " words" + unknown));
  $("grid").replaceChildren(...res.results.map((r) => {
    const card = el("div", {className: "card", dataset: {index: r.index, rank: r.rank},
                            title: "click: the attention behind this score"},
                    meta(r), health.images ? thumbnail(r.index, true) : captionList(r.captions),
                    imageLink(r.index));
    card.addEventListener("click", (e) => {  // the image and its link: its captions
      if (e.target.tagName !== "A" && e.target.tagName !== "IMG") {
        showExplain(q, r.index, "#" + r.rank + ", image " + r.index);
      }
    });
    return card;
  }));
  status(res.results.length + " of " + res.n_gallery + " images, " + ms + " ms" +
         (res.two_stage ? " (two-stage)" : ""));
  done("search");
}

async function image(i, k) {
  status("ranking the captions of image " + i + "...");
  const res = await api("/api/image/" + i + "?k=" + k);
  $("query").replaceChildren(el("h2", {}, "image " + i),
                             health.images ? thumbnail(i) : null,
                             el("p", {}, "its captions:"), captionList(res.query.captions));
  $("grid").replaceChildren(...res.results.map((r) => {
    const card = el("div", {className: "card" + (r.match ? " match" : ""),
                            dataset: {index: r.index, rank: r.rank},
                            title: r.match ? "one of the image's own captions" : ""},
                    meta(r), el("p", {className: "text"}, r.text), imageLink(r.image));
    card.addEventListener("click", (e) => {
      // a caption's attention: its text as the query (the same scores: retrieve.py's parity)
      if (e.target.tagName !== "A") showExplain(r.text, i, "caption " + r.index + ", image " + i);
    });
    return card;
  }));
  status(res.results.length + " of " + res.n_gallery + " captions; green: the image's own");
  done("image");
}

function failureItem(f, way) {
  let head, above;
  if (way === "t2i") {
    head = [el("div", {}, link("/?q=" + encodeURIComponent(f.text), f.text),
               " (caption " + f.query + ")"),
            el("span", {className: "gt-rank"}, "its image " + f.image + ": #" + f.rank)];
    above = f.above.map((a) => el("li", {}, "#" + a.rank + " ", link("/?image=" + a.index,
                                  "image " + a.index), " " + fmt(a.score) + ": " + a.captions[0]));
  } else {
    head = [el("div", {}, link("/?image=" + f.query, "image " + f.query), ": " + f.captions[0]),
            el("span", {className: "gt-rank"}, "its best caption: #" + f.rank)];
    above = f.above.map((a) => el("li", {}, "#" + a.rank + " " + fmt(a.score) + " " + a.text +
                                  " (image " + a.image + ")"));
  }
  // why: the attention of the ground-truth pair, and of the pair ranked first instead
  // (a pair is a text and an image: for i2t, the caption's text)
  const truth = way === "t2i" ? [f.text, f.image] : [f.text, f.query];
  const first = !f.above.length ? null :
    way === "t2i" ? [f.text, f.above[0].index] : [f.above[0].text, f.query];
  const why = !health.explain ? null : el("div", {className: "why"},
    button("attention: the truth", () => showExplain(...truth, "the ground truth, #" + f.rank)),
    first ? button("attention: #1", () => showExplain(...first, "ranked #1 instead")) : null);
  return el("li", {className: "failure", dataset: {query: f.query, rank: f.rank}},
            el("div", {className: "head"}, ...head),
            el("p", {className: "truth"}, "score " + fmt(f.score) +
               (way === "i2t" ? ": " + f.text : "") + "; ranked above it:"),
            el("ol", {className: "above"}, ...above), why);
}

async function failures(n) {
  status("loading the failures...");
  $("failures").hidden = false;
  for (const way of ["t2i", "i2t"]) {
    const most = way === "t2i" ? health.n_captions : health.n_images;
    const res = await api("/api/failures?direction=" + way + "&n=" + Math.min(n, most));
    $("fail-" + way).replaceChildren(...res.failures.map((f) => failureItem(f, way)));
  }
  status("the worst queries each way; their matrix: " + health.failures);
  done("failures");
}

async function route() {
  const p = new URLSearchParams(location.search);
  const k = p.get("k") || $("k").value;
  $("k").value = k;
  try {
    health = health || await api("/api/health");
    const r = health.recall;
    $("about").textContent = health.matchers.join(" + ") + " on " + health.data + " " +
      health.split + ": " + health.n_images + " images, " + health.n_captions + " captions; " +
      "R@1 " + r.t2i["R@1"].toFixed(1) + " text\u2192image, " + r.i2t["R@1"].toFixed(1) +
      " image\u2192text";
    if (p.get("q")) await search(p.get("q"), k);
    else if (p.get("image") !== null) await image(p.get("image"), k);
    else if (p.get("view") === "failures") await failures(p.get("n") || 20);
    else { status("type a sentence, or open the failures"); done("idle"); }
  } catch (e) {
    status(e.message, true);
    done("error");
  }
}

route();
