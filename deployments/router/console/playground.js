// The playground: images, edits with a painted mask, videos with live progress, the
// gallery and the account's usage. Public API calls only (see common.js).
"use strict";

const $ = (id) => document.getElementById(id);

// --- usage -----------------------------------------------------------------------

let usage = null;
let usageAt = 0;

async function refreshUsage() {
  try {
    usage = await api("/v1/usage");
    usageAt = Date.now();
    drawUsage();
  } catch (error) {
    /* the next action shows what is wrong */
  }
}

function drawUsage() {
  if (!usage) return;
  const gone = (Date.now() - usageAt) / 1000;
  const terms = usage.tier_terms;
  const rows = [
    ["Tier", `${usage.tier}${usage.role === "operator" ? " (operator key)" : ""}`],
    [
      "Images today",
      usage.images_per_day === null
        ? `${usage.images_today} (no daily limit)`
        : `${usage.images_today} of ${usage.images_per_day}, ${usage.images_left_today} left`,
    ],
    ["Quota day resets in", duration(usage.day_resets_in_s - gone)],
    ["Cooldown", usage.cooldown_left_s - gone > 0 ? duration(usage.cooldown_left_s - gone)
      : "none"],
    ["Per minute", usage.images_per_minute === null ? "no limit"
      : `${usage.images_last_minute} of ${usage.images_per_minute}`],
    ["Video", terms.video && terms.video.enabled
      ? `${usage.video_jobs_active} of ${usage.video_jobs_at_once} jobs at once`
      : "not available on this tier"],
    ["Largest request", [
      terms.caps.max_n ? `${terms.caps.max_n} images` : null,
      terms.caps.max_side ? `${terms.caps.max_side} px side` : null,
      terms.caps.max_steps ? `${terms.caps.max_steps} steps` : null,
    ].filter(Boolean).join(", ") || "no caps"],
  ];
  $("usage-figures").replaceChildren(
    ...rows.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })]),
  );
}

// --- models and tabs --------------------------------------------------------------

async function loadModels() {
  const models = (await api("/v1/models")).data;
  for (const select of document.querySelectorAll("select[data-task]")) {
    const fit = models.filter((model) => model.tasks.includes(select.dataset.task));
    select.replaceChildren(...fit.map((model) => el("option", { value: model.id, text: model.id })));
  }
}

function showTab(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  }
  for (const section of document.querySelectorAll("section.tab")) {
    section.hidden = section.id !== `tab-${name}`;
  }
  if (name === "gallery") loadGallery();
}

function formFields(form, names) {
  const body = {};
  for (const name of names) {
    const field = form.elements[name];
    if (!field || field.value === "") continue;
    body[name] = field.type === "number" ? Number(field.value) : field.value;
  }
  return body;
}

async function busy(form, work) {
  const button = form.querySelector("button[type=submit]");
  const spinner = form.querySelector(".busy");
  button.disabled = true;
  if (spinner) spinner.hidden = false;
  clearRefusal();
  try {
    await work();
  } catch (error) {
    showRefusal(error);
  } finally {
    button.disabled = false;
    if (spinner) spinner.hidden = true;
    refreshUsage();
  }
}

function imageCard(url, caption, extra) {
  return el(
    "figure", { class: "result" },
    el("img", { src: url, alt: caption }),
    el("figcaption", {}, el("span", { text: caption }), " ",
      el("a", { href: url, download: "", text: "download" }), extra || null),
  );
}

// --- images -----------------------------------------------------------------------

function setUpImages() {
  const form = $("image-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(form, async () => {
      const body = formFields(form, ["prompt", "model", "size", "n", "seed",
        "num_inference_steps"]);
      body.response_format = "url"; // kept for the gallery
      const answer = await api("/v1/images/generations", { method: "POST", json: body });
      $("image-results").replaceChildren(
        ...answer.data.map((image) => imageCard(image.url, `${body.prompt} · ${answer.size}`)),
      );
    });
  });
}

// --- edits: the photo, and a mask painted over it ---------------------------------

function setUpEdits() {
  const form = $("edit-form");
  const canvas = $("edit-canvas");
  const context = canvas.getContext("2d");
  let photo = null; // the uploaded image
  let mask = null; // same size as the photo: opaque, transparent where painted
  let painting = false;
  let painted = false;

  function redraw() {
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (!photo) return;
    context.drawImage(photo, 0, 0, canvas.width, canvas.height);
    if (!painted) return;
    // show painted areas: where the mask is transparent
    const overlay = document.createElement("canvas");
    overlay.width = canvas.width;
    overlay.height = canvas.height;
    const o = overlay.getContext("2d");
    o.fillStyle = "rgba(255, 40, 80, 0.55)";
    o.fillRect(0, 0, overlay.width, overlay.height);
    o.globalCompositeOperation = "destination-out";
    o.drawImage(mask, 0, 0, overlay.width, overlay.height);
    context.drawImage(overlay, 0, 0);
  }

  function resetMask() {
    mask = document.createElement("canvas");
    mask.width = photo.naturalWidth;
    mask.height = photo.naturalHeight;
    const m = mask.getContext("2d");
    m.fillStyle = "#000";
    m.fillRect(0, 0, mask.width, mask.height);
    painted = false;
    redraw();
  }

  function paint(event) {
    if (!painting || !photo) return;
    const box = canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * mask.width;
    const y = ((event.clientY - box.top) / box.height) * mask.height;
    const radius = (Number($("brush").value) / box.width) * mask.width;
    const m = mask.getContext("2d");
    m.globalCompositeOperation = "destination-out";
    m.beginPath();
    m.arc(x, y, radius, 0, 2 * Math.PI);
    m.fill();
    painted = true;
    redraw();
  }

  form.elements.image.addEventListener("change", () => {
    const file = form.elements.image.files[0];
    if (!file) return;
    const image = new Image();
    image.onload = () => {
      photo = image;
      const side = Math.max(image.naturalWidth, image.naturalHeight);
      const scale = Math.min(512 / side, Math.max(1, 256 / side)); // small ones shown larger
      canvas.width = Math.round(image.naturalWidth * scale);
      canvas.height = Math.round(image.naturalHeight * scale);
      resetMask();
    };
    image.src = URL.createObjectURL(file);
  });
  canvas.addEventListener("pointerdown", (event) => { painting = true; paint(event); });
  canvas.addEventListener("pointermove", paint);
  window.addEventListener("pointerup", () => { painting = false; });
  $("clear-mask").addEventListener("click", () => { if (photo) resetMask(); });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(form, async () => {
      const data = new FormData();
      // The photo as this page shows it (EXIF rotation applied), so that it and the
      // mask painted over it are the same size and the same way up.
      const upright = document.createElement("canvas");
      upright.width = photo.naturalWidth;
      upright.height = photo.naturalHeight;
      upright.getContext("2d").drawImage(photo, 0, 0);
      const photoPng = await new Promise((done) => upright.toBlob(done, "image/png"));
      data.append("image", photoPng, "photo.png");
      if (painted) {
        const png = await new Promise((done) => mask.toBlob(done, "image/png"));
        data.append("mask", png, "mask.png");
      }
      const fields = formFields(form, ["prompt", "model", "strength", "seed"]);
      for (const [name, value] of Object.entries(fields)) data.append(name, String(value));
      data.append("response_format", "url");
      const answer = await api("/v1/images/edits", { method: "POST", body: data });
      $("edit-results").replaceChildren(
        ...answer.data.map((image) => imageCard(image.url, `${fields.prompt} · ${answer.size}`)),
      );
    });
  });
}

// --- videos: create, then follow the job ------------------------------------------

async function videoBlob(id, variant) {
  const response = await api(`/v1/videos/${encodeURIComponent(id)}/content?variant=${variant}`,
    { raw: true });
  return URL.createObjectURL(await response.blob());
}

function jobView(job) {
  const view = el("div", { class: "job", "data-job": job.id });
  const title = el("div", { class: "job-title" });
  const bar = el("progress", { max: "100", value: "0" });
  const state = el("span", { class: "job-state" });
  const media = el("div", { class: "job-media" });
  view.append(title, bar, state, media);
  view.update = (current) => {
    title.textContent = `${current.prompt} · ${current.model} · ${current.size}`;
    bar.value = current.progress;
    let text = `${current.status} · ${current.progress}%`;
    if (current.status === "queued" && current.queue_position) {
      text += ` · position ${current.queue_position} in the queue`;
    }
    if (current.status === "failed" && current.error) text += ` · ${current.error.message}`;
    state.textContent = text;
  };
  view.showVideo = async (current) => {
    const url = await videoBlob(current.id, "video");
    media.replaceChildren(
      el("video", { src: url, controls: "", loop: "", muted: "", autoplay: "" }),
      el("a", { href: url, download: `${current.id}.mp4`, text: "download" }),
    );
  };
  view.update(job);
  return view;
}

async function follow(job, view) {
  let current = job;
  while (current.status === "queued" || current.status === "in_progress") {
    await new Promise((done) => setTimeout(done, 700));
    if (!view.isConnected) return; // its list was redrawn: that copy follows it
    try {
      current = await api(`/v1/videos/${encodeURIComponent(job.id)}`);
    } catch (error) {
      showRefusal(error);
      return;
    }
    view.update(current);
  }
  refreshUsage();
  if (current.status === "completed" && view.isConnected) await view.showVideo(current);
}

function setUpVideos() {
  const form = $("video-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(form, async () => {
      const data = new FormData();
      const fields = formFields(form, ["prompt", "model", "seconds", "size", "seed"]);
      for (const [name, value] of Object.entries(fields)) data.append(name, String(value));
      const reference = form.elements.input_reference.files[0];
      if (reference) data.append("input_reference", reference);
      const job = await api("/v1/videos", { method: "POST", body: data });
      const view = jobView(job);
      $("video-jobs").prepend(view);
      follow(job, view);
    });
  });
}

// --- gallery ----------------------------------------------------------------------

async function loadGallery() {
  clearRefusal();
  try {
    const images = await api("/v1/images?limit=50");
    $("gallery-images").replaceChildren(
      ...(images.data.length ? images.data.map((image) => imageCard(
        image.url, `${image.prompt} · ${image.model} · ${image.size}`,
        el("small", { text: ` · kept until ${new Date(image.expires_at * 1000)
          .toLocaleString()}` }),
      )) : [el("p", { class: "hint", text: "No stored images yet." })]),
    );
    const videos = await api("/v1/videos?limit=20&order=desc");
    const views = videos.data.map((job) => {
      const view = jobView(job);
      if (job.status === "completed") {
        const button = el("button", { type: "button", text: "Play" });
        button.addEventListener("click", () => view.showVideo(job).catch(showRefusal));
        view.querySelector(".job-media").append(button);
        videoBlob(job.id, "thumbnail").then((url) => {
          view.querySelector(".job-media").prepend(el("img", { src: url, alt: job.prompt }));
        }).catch(() => {});
      } else if (job.status === "queued" || job.status === "in_progress") {
        follow(job, view);
      }
      return view;
    });
    $("gallery-videos").replaceChildren(
      ...(views.length ? views : [el("p", { class: "hint", text: "No video jobs yet." })]),
    );
  } catch (error) {
    showRefusal(error);
  }
}

// --- start ------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => showTab(tab.dataset.tab));
  }
  $("gallery-refresh").addEventListener("click", loadGallery);
  setUpImages();
  setUpEdits();
  setUpVideos();
  setUpSignIn((first) => {
    usage = first;
    usageAt = Date.now();
    drawUsage();
    loadModels().catch(showRefusal);
    setInterval(drawUsage, 1000); // the countdowns
    setInterval(refreshUsage, 15000);
  });
});
