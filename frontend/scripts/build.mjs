// Builds the package from its one source of truth: the files the Python wheel serves, in
// asgi_session_sync/static/. Each is copied byte for byte into dist/, which package.json's
// `exports` point at, so `npm install asgi-session-sync` and `/static/session-sync/...` from the
// wheel run the same code. The repository's LICENSE is copied beside package.json.
//
// npm runs this before `npm pack` and `npm publish` (the `prepack` script); `npm run build` runs
// it by hand. Nothing is transformed: there is no bundler and nothing to compile.
import { copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { fileURLToPath } from "node:url";

const PACKAGE = fileURLToPath(new URL("..", import.meta.url));
const STATIC = fileURLToPath(new URL("../../asgi_session_sync/static/", import.meta.url));
const DIST = `${PACKAGE}dist/`;

// A clean dist/: a file removed from static/ must not live on in the tarball.
rmSync(DIST, { recursive: true, force: true });
mkdirSync(DIST);
const files = readdirSync(STATIC, { withFileTypes: true })
  .filter((entry) => entry.isFile())
  .map((entry) => entry.name)
  .sort();
for (const name of files) copyFileSync(`${STATIC}${name}`, `${DIST}${name}`);
copyFileSync(fileURLToPath(new URL("../../LICENSE", import.meta.url)), `${PACKAGE}LICENSE`);
console.error(`copied ${files.join(", ")} from asgi_session_sync/static/ into dist/`);
