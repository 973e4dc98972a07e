import { useQuery, useQueryClient } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { useNavigate, useSearchParams } from "react-router";
import { ApiError, api, unwrap } from "../api/client";
import { mfaConfirm, mfaEnroll, signIn, type MfaEnrollment } from "../api/extra";
import { enrollOnlyUser, setEnrollOnly } from "../auth";
import { ErrorMessage } from "../components/common";

function safeNext(next: string | null): string {
  // Only paths of this app, never another origin.
  return next && next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/signin") ? next : "/";
}

export function SignInPage() {
  const [params] = useSearchParams();
  const next = safeNext(params.get("next"));
  const navigate = useNavigate();
  const qc = useQueryClient();
  const [user, setUser] = useState("");
  const [password, setPassword] = useState("");
  const [code, setCode] = useState("");
  const [useRecovery, setUseRecovery] = useState(false);
  const [mfa, setMfa] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<unknown>(null);
  // Single sign-on, where the server has an identity provider: the provider signs the browser in
  // and covm's callback sets the session cookie and comes back to `next`.
  const sso = useQuery({ queryKey: ["sso"], queryFn: () => unwrap(api.GET("/api/v1/sso")), staleTime: 60_000 });

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const body = { user, password } as Parameters<typeof signIn>[0];
      if (mfa && code) {
        if (useRecovery) body.recovery_code = code.trim();
        else body.totp = code.trim();
      }
      const s = await signIn(body);
      qc.clear();
      if (s.enroll_only) {
        setEnrollOnly(s.user || user);
        navigate(`/enroll?next=${encodeURIComponent(next)}`, { replace: true });
      } else {
        setEnrollOnly(null);
        navigate(next, { replace: true });
      }
    } catch (err) {
      if (err instanceof ApiError && err.code === "mfa_required") {
        setMfa(true);
        setError(mfa ? err : null);
      } else {
        setError(err);
      }
    } finally {
      setBusy(false);
    }
  };

  return (
    <div className="center-page">
      <form className="card signin" onSubmit={submit}>
        <h1>covm</h1>
        <p className="muted">Sign in to manage virtual machines.</p>
        <label>
          User
          <input name="user" autoComplete="username" value={user} onChange={(e) => setUser(e.target.value)} required autoFocus />
        </label>
        <label>
          Password
          <input
            name="password"
            type="password"
            autoComplete="current-password"
            value={password}
            onChange={(e) => setPassword(e.target.value)}
            required
          />
        </label>
        {mfa ? (
          <>
            <p className="hint">
              {useRecovery
                ? "Enter one of your recovery codes."
                : "Two-factor sign-in is on: enter the six-digit code of your authenticator app."}
            </p>
            <label>
              {useRecovery ? "Recovery code" : "Code"}
              <input
                name="code"
                inputMode={useRecovery ? "text" : "numeric"}
                autoComplete="one-time-code"
                pattern={useRecovery ? undefined : "[0-9]{6}"}
                value={code}
                onChange={(e) => setCode(e.target.value)}
                required
                autoFocus
              />
            </label>
            <label className="check">
              <input type="checkbox" checked={useRecovery} onChange={(e) => setUseRecovery(e.target.checked)} />
              Use a recovery code instead
            </label>
          </>
        ) : null}
        <ErrorMessage error={error} />
        <button type="submit" className="primary" disabled={busy}>
          Sign in
        </button>
        {sso.data?.enabled ? (
          <p className="sso">
            or <a href={`/api/v1/sso/login?next=${encodeURIComponent(next)}`}>sign in with single sign-on</a>
          </p>
        ) : null}
      </form>
    </div>
  );
}

export function EnrollPage() {
  const [params] = useSearchParams();
  const next = safeNext(params.get("next"));
  const navigate = useNavigate();
  const qc = useQueryClient();
  const user = enrollOnlyUser();
  const [enrollment, setEnrollment] = useState<MfaEnrollment | null>(null);
  const [code, setCode] = useState("");
  const [error, setError] = useState<unknown>(null);
  const [done, setDone] = useState(false);
  const [busy, setBusy] = useState(false);

  if (!user) {
    return (
      <div className="center-page">
        <div className="card">
          <p>No enrollment is pending.</p>
          <button type="button" onClick={() => navigate(next, { replace: true })}>
            Continue
          </button>
        </div>
      </div>
    );
  }

  const start = async () => {
    setBusy(true);
    setError(null);
    try {
      setEnrollment(await mfaEnroll(user));
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  };
  const confirm = async (e: FormEvent) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await mfaConfirm(user, code.trim());
      setDone(true);
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  const proceed = () => {
    setEnrollOnly(null);
    qc.clear();
    // The enroll-only session may still be limited; the app sends to sign-in on a 401.
    navigate(next, { replace: true });
  };

  return (
    <div className="center-page">
      <div className="card enroll">
        <h1>Two-factor enrollment required</h1>
        <p>
          A policy requires two-factor sign-in for <strong>{user}</strong>. Set up an authenticator app to
          continue.
        </p>
        {!enrollment ? (
          <button type="button" className="primary" onClick={start} disabled={busy}>
            Set up two-factor sign-in
          </button>
        ) : done ? (
          <>
            <p role="status">Two-factor sign-in is on.</p>
            <button type="button" className="primary" onClick={proceed}>
              Continue
            </button>
          </>
        ) : (
          <form onSubmit={confirm}>
            <p>Add this secret to your authenticator app (or open the link on your phone):</p>
            <p>
              <code className="secret">{enrollment.secret}</code>
            </p>
            <p>
              <a href={enrollment.otpauth_url}>{enrollment.otpauth_url}</a>
            </p>
            <p>Recovery codes (each works once; keep them safe, they are shown only now):</p>
            <ul className="codes">
              {enrollment.recovery_codes.map((c) => (
                <li key={c}>
                  <code>{c}</code>
                </li>
              ))}
            </ul>
            <label>
              Code
              <input
                inputMode="numeric"
                autoComplete="one-time-code"
                value={code}
                onChange={(e) => setCode(e.target.value)}
                required
              />
            </label>
            <button type="submit" className="primary" disabled={busy}>
              Confirm
            </button>
          </form>
        )}
        <ErrorMessage error={error} />
      </div>
    </div>
  );
}
