using Microsoft.Win32.SafeHandles;

namespace Vmsnap.Storage;

/// <summary>
/// A read-only stream over a pipe, socket or terminal descriptor (standard input) whose reads end
/// with <see cref="OperationCanceledException"/> soon after the token is cancelled, even while no
/// data comes: a blocked read(2) cannot be interrupted, so each read first waits in poll(2) in
/// short slices and looks at the token between them. Ctrl-C during an import from a stalled pipe
/// then cleans up at once instead of waiting for the writer.
/// </summary>
internal sealed class CancellableInputStream(SafeFileHandle handle, string description, CancellationToken cancellationToken) : Stream
{
    private const int PollSliceMs = 100;

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        if (buffer.IsEmpty) return 0;
        while (true)
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (!NativeFile.WaitReadable(handle, PollSliceMs, description)) continue;
            int n = NativeFile.ReadOnce(handle, buffer, description);
            if (n >= 0) return n;
        }
    }

    public override void Flush() { }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing) handle.Dispose();
        base.Dispose(disposing);
    }
}
