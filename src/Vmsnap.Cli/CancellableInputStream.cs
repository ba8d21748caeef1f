using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using Vmsnap.Storage;

namespace Vmsnap.Cli;

/// <summary>
/// A read-only stream over a pipe, socket or terminal descriptor (standard input) whose reads end
/// with <see cref="OperationCanceledException"/> soon after the token is cancelled, even while no
/// data comes: a blocked read(2) cannot be interrupted, so each read first waits in poll(2) in
/// short slices and looks at the token between them. Ctrl-C during an import from a stalled pipe
/// then cleans up at once instead of waiting for the writer.
/// </summary>
internal sealed partial class CancellableInputStream(SafeFileHandle handle, string description, CancellationToken cancellationToken) : Stream
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
            if (!WaitReadable(handle, PollSliceMs, description)) continue;
            int n = ReadOnce(handle, buffer, description);
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
    private const int EINTR = 4, EAGAIN = 11;
    private const short POLLIN = 1;

    [LibraryImport("libc", SetLastError = true)]
    private static partial int poll(ref PollFd fd, nuint count, int timeoutMs);

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial nint read(int fd, byte* buffer, nuint count);

    [StructLayout(LayoutKind.Sequential)]
    private struct PollFd
    {
        public int Fd;
        public short Events;
        public short Revents;
    }

    /// <summary>
    /// Waits up to <paramref name="timeoutMs"/> for the descriptor to have something to read, end of
    /// file or an error included: true when a read would not block.
    /// </summary>
    private static bool WaitReadable(SafeFileHandle handle, int timeoutMs, string what)
    {
        var fd = new PollFd { Fd = (int)handle.DangerousGetHandle(), Events = POLLIN };
        int rc = poll(ref fd, 1, timeoutMs);
        if (rc >= 0) return rc > 0;
        int errno = Marshal.GetLastPInvokeError();
        if (errno == EINTR) return false;
        throw new StorageException($"poll on '{what}' failed: {Marshal.GetPInvokeErrorMessage(errno)}", errno);
    }

    /// <summary>One read(2): the bytes read, 0 at end of file, -1 when it would block or was interrupted.</summary>
    private static unsafe int ReadOnce(SafeFileHandle handle, Span<byte> buffer, string what)
    {
        nint n;
        fixed (byte* p = buffer) n = read((int)handle.DangerousGetHandle(), p, (nuint)buffer.Length);
        if (n >= 0) return (int)n;
        int errno = Marshal.GetLastPInvokeError();
        if (errno is EINTR or EAGAIN) return -1;
        throw new StorageException($"read on '{what}' failed: {Marshal.GetPInvokeErrorMessage(errno)}", errno);
    }
}
