/// <reference types="vitest/config" />
import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

// The covm server serves dist/ at `/` itself (same origin); in development Vite
// proxies the API (and its WebSockets and SSE feed) to a local covm.
export default defineConfig({
  plugins: [react()],
  build: {
    outDir: "dist",
    assetsDir: "assets",
    // noVNC uses top-level await.
    target: "es2022",
    sourcemap: false,
  },
  server: {
    port: 5173,
    proxy: {
      "/api": {
        target: "http://127.0.0.1:8006",
        ws: true,
        changeOrigin: false,
        // Send the headers of the SSE feed at once (the proxy would hold them until the
        // first event, and the EventSource would not report itself open).
        configure: (proxy) => {
          proxy.on("proxyRes", (proxyRes, _req, res) => {
            if (String(proxyRes.headers["content-type"] ?? "").startsWith("text/event-stream")) {
              setImmediate(() => res.flushHeaders());
            }
          });
        },
      },
    },
  },
  test: {
    include: ["src/**/*.test.ts"],
    environment: "node",
  },
});
