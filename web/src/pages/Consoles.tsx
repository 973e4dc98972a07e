// The VM's screen (noVNC) and serial console (xterm.js). Both libraries load on demand
// (dynamic import) so that they stay out of the initial bundle.

import { useEffect, useRef, useState } from "react";
import { ApiError, type VmView } from "../api/client";
import { consoleTicket, consoleUrl } from "../api/extra";
import type { Privileges } from "../auth";
import { ErrorMessage } from "../components/common";

type RFBType = import("@novnc/novnc").default;

function isRunning(vm: VmView) {
  const s = vm.runtime.power_state ?? "off";
  return s === "running" || s === "paused";
}

function NotRunning() {
  return (
    <p role="status" className="muted console-off">
      The VM is not running
    </p>
  );
}

function consoleError(e: unknown): unknown {
  if (e instanceof ApiError && e.code === "console_unavailable") return "not-running";
  return e;
}

function VncConsole({ vm, privs }: { vm: VmView; privs: Privileges }) {
  const screen = useRef<HTMLDivElement>(null);
  const rfb = useRef<RFBType | null>(null);
  const [status, setStatus] = useState<"connecting" | "connected" | "disconnected">("connecting");
  const [error, setError] = useState<unknown>(null);
  const [attempt, setAttempt] = useState(0);
  const running = isRunning(vm);
  const interact = privs.need("VirtualMachine.Interact.ConsoleInteract");

  useEffect(() => {
    if (!running || interact.disabled || !screen.current) return;
    let cancelled = false;
    setError(null);
    setStatus("connecting");
    (async () => {
      try {
        const [{ default: RFB }, t] = await Promise.all([import("@novnc/novnc"), consoleTicket(vm.id)]);
        if (cancelled || !screen.current) return;
        const r = new RFB(screen.current, consoleUrl(vm.id, "vnc", t.ticket), { wsProtocols: ["binary"] });
        r.scaleViewport = true;
        r.background = "#111";
        r.addEventListener("connect", () => setStatus("connected"));
        r.addEventListener("disconnect", () => {
          setStatus("disconnected");
          if (rfb.current === r) rfb.current = null;
        });
        rfb.current = r;
      } catch (e) {
        if (!cancelled) {
          setError(consoleError(e));
          setStatus("disconnected");
        }
      }
    })();
    return () => {
      cancelled = true;
      rfb.current?.disconnect();
      rfb.current = null;
    };
  }, [vm.id, running, interact.disabled, attempt]);

  return (
    <section aria-label="Console" className="panel console">
      <h3>Screen</h3>
      {!running || error === "not-running" ? (
        <NotRunning />
      ) : interact.disabled ? (
        <p className="muted">{interact.title}</p>
      ) : (
        <>
          <div className="row">
            <span className="muted">{status === "connected" ? "Connected" : status === "connecting" ? "Connecting…" : "Disconnected"}</span>
            <button type="button" disabled={status !== "connected"} onClick={() => rfb.current?.sendCtrlAltDel()}>
              Ctrl-Alt-Del
            </button>
            <button type="button" disabled={status === "connecting"} onClick={() => setAttempt((a) => a + 1)}>
              Reconnect
            </button>
          </div>
          {error ? <ErrorMessage error={error} /> : null}
          <div className="vnc-screen" ref={screen} />
        </>
      )}
    </section>
  );
}

function SerialConsole({ vm, privs }: { vm: VmView; privs: Privileges }) {
  const box = useRef<HTMLDivElement>(null);
  const [status, setStatus] = useState<"connecting" | "connected" | "disconnected">("connecting");
  const [error, setError] = useState<unknown>(null);
  const [attempt, setAttempt] = useState(0);
  const running = isRunning(vm);
  const interact = privs.need("VirtualMachine.Interact.ConsoleInteract");

  useEffect(() => {
    if (!running || interact.disabled || !box.current) return;
    let cancelled = false;
    let ws: WebSocket | null = null;
    let term: import("@xterm/xterm").Terminal | null = null;
    setError(null);
    setStatus("connecting");
    (async () => {
      try {
        const [{ Terminal }, , t] = await Promise.all([
          import("@xterm/xterm"),
          import("@xterm/xterm/css/xterm.css"),
          consoleTicket(vm.id),
        ]);
        if (cancelled || !box.current) return;
        term = new Terminal({ rows: 24, cols: 100, fontSize: 13, scrollback: 5000, cursorBlink: true });
        term.open(box.current);
        const decoder = new TextDecoder("utf-8");
        ws = new WebSocket(consoleUrl(vm.id, "serial", t.ticket));
        ws.binaryType = "arraybuffer";
        ws.onopen = () => setStatus("connected");
        ws.onmessage = (m) => {
          if (typeof m.data === "string") term?.write(m.data);
          else term?.write(decoder.decode(new Uint8Array(m.data as ArrayBuffer), { stream: true }));
        };
        ws.onclose = () => setStatus("disconnected");
        ws.onerror = () => setStatus("disconnected");
        term.onData((d) => {
          if (ws?.readyState === WebSocket.OPEN) ws.send(d);
        });
        term.focus();
      } catch (e) {
        if (!cancelled) {
          setError(consoleError(e));
          setStatus("disconnected");
        }
      }
    })();
    return () => {
      cancelled = true;
      ws?.close();
      term?.dispose();
    };
  }, [vm.id, running, interact.disabled, attempt]);

  return (
    <section aria-label="Serial console" className="panel console">
      <h3>Serial console</h3>
      {!running || error === "not-running" ? (
        <NotRunning />
      ) : interact.disabled ? (
        <p className="muted">{interact.title}</p>
      ) : (
        <>
          <div className="row">
            <span className="muted">{status === "connected" ? "Connected" : status === "connecting" ? "Connecting…" : "Disconnected"}</span>
            <button type="button" disabled={status === "connecting"} onClick={() => setAttempt((a) => a + 1)}>
              Reconnect serial
            </button>
          </div>
          {error ? <ErrorMessage error={error} /> : null}
          <div className="serial-term" ref={box} />
        </>
      )}
    </section>
  );
}

export default function Consoles({ vm, privs }: { vm: VmView; privs: Privileges }) {
  return (
    <div className="consoles">
      <VncConsole vm={vm} privs={privs} />
      <SerialConsole vm={vm} privs={privs} />
    </div>
  );
}
