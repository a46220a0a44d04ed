// Sends the caller's Kubernetes projected service-account token on every call, unary or streaming,
// as `authorization: Bearer <token>` (docs/authentication-clients.md).
//
// The kubelet rotates the token by replacing the file, well before the old one expires. So every
// call stats the file, and reads it again only when its modification time or size changed: cheap per
// call, and the first call after a rotation already carries the new token.
import { readFileSync, statSync } from "node:fs";
import {
  credentials,
  InterceptingCall,
  Metadata,
  status,
  type CallCredentials,
  type Interceptor,
} from "@grpc/grpc-js";

// The file's token, read again when the file changed since the last read.
export function tokenReader(path: string): () => string {
  let token = "";
  let modified = -1;
  let size = -1;
  return () => {
    const stat = statSync(path); // follows the kubelet's symlinks to the current file
    if (token && stat.mtimeMs === modified && stat.size === size) return token;
    const read = readFileSync(path, "utf8").trim();
    if (!read) throw new Error(`the token file ${path} is empty`);
    // Replaced between the stat and the read? Then the next call sees another time and reads again.
    [token, modified, size] = [read, stat.mtimeMs, stat.size];
    return token;
  };
}

// The token as call credentials. A file that cannot be read fails the call before anything is sent.
export function bearerToken(token: () => string): CallCredentials {
  return credentials.createFromMetadataGenerator((_options, callback) => {
    try {
      const metadata = new Metadata();
      metadata.set("authorization", `Bearer ${token()}`);
      callback(null, metadata);
    } catch (error) {
      // UNAUTHENTICATED, as grpc-go and grpc-java say (grpc-js would say UNKNOWN).
      const message = `cannot read the token: ${error instanceof Error ? error.message : error}`;
      callback(Object.assign(new Error(message), { code: status.UNAUTHENTICATED }));
    }
  });
}

// Hands the call credentials to every call of a client. Over TLS,
// `credentials.combineChannelCredentials(tls, callCredentials)` does the same for a whole channel,
// but grpc-js refuses to combine them with insecure channel credentials (a bearer token would cross
// the network readable), and CI runs this example in plaintext; per call, grpc-js sends them over
// either. In production call over TLS (--ca): whoever reads the token can use it until it expires.
export const withCallCredentials =
  (callCredentials: CallCredentials): Interceptor =>
  (options, nextCall) =>
    new InterceptingCall(nextCall({ ...options, credentials: callCredentials }));
