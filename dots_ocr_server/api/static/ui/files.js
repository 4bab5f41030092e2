// Files the person picks: what kind they are, their bytes as base64 (how the page sends a page
// to /ui/render, /ocr and /inspect), and their SHA-256 (to tell a document job's file again).

export function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`Could not read ${file.name}: ${reader.error}`));
    reader.readAsDataURL(file);
  });
}

/** "pdf", "image", or null for a file that is neither. */
export function kindOf(file) {
  if (file.type === "application/pdf" || /\.pdf$/i.test(file.name)) return "pdf";
  if (file.type.startsWith("image/") || /\.(png|jpe?g|webp|bmp|tiff?|gif)$/i.test(file.name)) return "image";
  return null;
}

export function notAPageMessage(file) {
  return `Not an image or a PDF: "${file.name}" (${file.type || "unknown type"}). ` +
    "Pick a PNG, JPEG, WebP, BMP, TIFF or GIF image, or a PDF.";
}

/** The file's SHA-256 in hex, or null where the browser has no WebCrypto (a page served over
 *  plain HTTP from another host is not a secure context). */
export async function sha256Hex(file) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}
