package com.tiwfacade.example;

import io.grpc.CallCredentials;
import io.grpc.Metadata;
import io.grpc.Status;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.BasicFileAttributes;
import java.nio.file.attribute.FileTime;
import java.util.concurrent.Executor;

/**
 * Sends the caller's Kubernetes projected service-account token on every call, unary or streaming,
 * as {@code authorization: Bearer <token>} (docs/authentication-clients.md). Given to a channel with
 * {@code CompositeChannelCredentials.create(channelCredentials, this)}, or to one stub with
 * {@code stub.withCallCredentials(this)}.
 *
 * <p>The kubelet rotates the token by replacing the file, well before the old one expires. So every
 * call reads the file's attributes, and the file itself again only when its modification time or
 * size changed: cheap per call, and the first call after a rotation already carries the new token.
 *
 * <p>grpc-java sends call credentials over plaintext too, which CI's runs rely on. Whoever reads a
 * bearer token can use it until it expires: in production call over TLS (--ca), and refuse here when
 * {@code info.getSecurityLevel()} is not {@code PRIVACY_AND_INTEGRITY}.
 */
final class TokenFileCredentials extends CallCredentials {
  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

  private final Path path;
  // Guarded by this: calls run concurrently.
  private String token;
  private FileTime modified;
  private long size;

  TokenFileCredentials(Path path) {
    this.path = path;
  }

  @Override
  public void applyRequestMetadata(RequestInfo info, Executor appExecutor, MetadataApplier applier) {
    // Reading a file blocks: on the application's executor, not on the transport's thread.
    appExecutor.execute(() -> {
      try {
        Metadata headers = new Metadata();
        headers.put(AUTHORIZATION, "Bearer " + current());
        applier.apply(headers);
      } catch (IOException e) { // the call fails UNAUTHENTICATED, before anything is sent
        applier.fail(Status.UNAUTHENTICATED.withDescription("cannot read the token file " + path).withCause(e));
      }
    });
  }

  /** The file's token, read again when the file changed since the last read. */
  synchronized String current() throws IOException {
    // Follows the kubelet's symlinks to the current file.
    BasicFileAttributes attributes = Files.readAttributes(path, BasicFileAttributes.class);
    if (token != null && attributes.lastModifiedTime().equals(modified) && attributes.size() == size) {
      return token;
    }
    String read = Files.readString(path).strip();
    if (read.isEmpty()) {
      throw new IOException("the token file " + path + " is empty");
    }
    // Replaced between the two reads? Then the next call sees another time and reads again.
    token = read;
    modified = attributes.lastModifiedTime();
    size = attributes.size();
    return token;
  }
}
