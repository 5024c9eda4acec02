// The inpainting mask: painted over the uploaded image with the pointer (brush or eraser, a size), kept at the
// image's own pixel size, and exported as a black-and-white PNG (white = repaint), which A1111's img2img takes.

const PAINT = "rgba(255, 40, 40, 1)";

export class MaskPainter {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.tool = "brush";
    this.size = 24; // in CSS pixels of the shown canvas
    this.painted = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "pointerleave"]) canvas.addEventListener(type, () => { this.last = null; });
  }

  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.painted = false;
  }

  point(e) {
    const box = this.canvas.getBoundingClientRect();
    const scale = this.canvas.width / box.width;
    return { x: (e.clientX - box.left) * scale, y: (e.clientY - box.top) * scale, scale };
  }

  down(e) {
    if (e.button !== 0) return;
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (!this.last) return;
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  stroke(from, to) {
    const c = this.ctx;
    c.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
    c.strokeStyle = PAINT;
    c.lineWidth = this.size * to.scale;
    c.lineCap = c.lineJoin = "round";
    c.beginPath();
    c.moveTo(from.x, from.y);
    c.lineTo(to.x + 0.01, to.y);
    c.stroke();
    if (this.tool === "brush") this.painted = true;
  }

  // Keyboard alternatives to painting.
  fill() {
    this.ctx.globalCompositeOperation = "source-over";
    this.ctx.fillStyle = PAINT;
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = true;
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
  }

  invert() {
    const img = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    const d = img.data;
    for (let i = 0; i < d.length; i += 4) {
      const on = d[i + 3] > 127;
      d[i] = 255; d[i + 1] = 40; d[i + 2] = 40; d[i + 3] = on ? 0 : 255;
    }
    this.ctx.putImageData(img, 0, 0);
    this.painted = true;
  }

  // Fraction of the image masked (0..1).
  coverage() {
    if (!this.canvas.width) return 0;
    const d = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    let on = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 127) on++;
    return on / (d.length / 4);
  }

  // The mask as base64 PNG (no data: prefix): white where painted, black elsewhere; null when nothing is painted.
  toBase64() {
    if (!this.painted || this.coverage() === 0) return null;
    const { width, height } = this.canvas;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const o = out.getContext("2d");
    const src = this.ctx.getImageData(0, 0, width, height);
    const dst = o.createImageData(width, height);
    for (let i = 0; i < src.data.length; i += 4) {
      const v = src.data[i + 3] > 127 ? 255 : 0;
      dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = v;
      dst.data[i + 3] = 255;
    }
    o.putImageData(dst, 0, 0);
    return out.toDataURL("image/png").split(",", 2)[1];
  }
}
