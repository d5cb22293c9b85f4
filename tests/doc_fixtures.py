"""PDFs written by hand for the tests: pages of text (Helvetica), pages with a drawn bar chart, pages that are
only a picture (a JPEG), and any number of them, so no test depends on a PDF library to make its inputs."""

from __future__ import annotations

import io

from PIL import Image


def _text_stream(lines: list[str], top: float = 760) -> bytes:
    out = ["BT /F1 12 Tf 14 TL", f"72 {top} Td"]
    for line in lines:
        safe = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        out.append(f"({safe}) Tj T*")
    out.append("ET")
    return "\n".join(out).encode("latin-1")


def _chart_stream(values: list[float]) -> bytes:
    bars = [f"0.2 0.4 0.8 rg {100 + 60 * i} 200 40 {v * 3:.1f} re f" for i, v in enumerate(values)]
    return ("\n".join(["0 0 0 RG 90 190 m 500 190 l S", *bars])).encode()


def make_pdf(pages: list[dict], size: tuple[float, float] = (612, 792)) -> bytes:
    """pages: each {"text": [lines]} and/or {"chart": [bar heights]} and/or {"picture": (w, h, rgb)}."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    page_ids = []
    pages_id = len(objects) + 2 * len(pages) + 1 + sum(1 for p in pages if "picture" in p)  # filled in below
    kids: list[int] = []
    for spec in pages:
        stream = b""
        resources = f"/Font << /F1 {font} 0 R >>"
        if "picture" in spec:
            w, h, rgb = spec["picture"]
            buf = io.BytesIO()
            Image.new("RGB", (w, h), rgb).save(buf, format="JPEG")
            jpeg = buf.getvalue()
            pic = add(b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB "
                      b"/BitsPerComponent 8 /Filter /DCTDecode /Length %d >>\nstream\n" % (w, h, len(jpeg))
                      + jpeg + b"\nendstream")  # fmt: skip
            resources += f" /XObject << /Im1 {pic} 0 R >>"
            stream += b"q 400 0 0 300 100 300 cm /Im1 Do Q\n"
        if "chart" in spec:
            stream += _chart_stream(spec["chart"]) + b"\n"
        if "text" in spec:
            stream += _text_stream(spec["text"])
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(len(objects) + 1)
        page_ids.append(add(f"<< /Type /Page /Parent PAGES 0 R /MediaBox [0 0 {size[0]} {size[1]}] "
                            f"/Resources << {resources} >> /Contents {content} 0 R >>".encode()))  # fmt: skip
    pages_id = add(b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % k for k in kids) + b"] /Count %d >>"
                   % len(kids))  # fmt: skip
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id)
    objects = [o.replace(b"PAGES 0 R", b"%d 0 R" % pages_id) for o in objects]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, xref))
    return out.getvalue()
