import { Link } from "react-router";

export function NotFoundPage() {
  return (
    <section>
      <h1>Not found</h1>
      <p>There is no page at this address.</p>
      <p>
        <Link to="/">Back to the VMs</Link>
      </p>
    </section>
  );
}
