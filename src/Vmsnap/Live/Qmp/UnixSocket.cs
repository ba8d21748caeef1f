using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace Vmsnap.Live.Qmp;

/// <summary>
/// What .NET's socket API does not offer for talking to QEMU: a connected pair of Unix stream sockets
/// (the migration channel), sending a message with a file descriptor attached (SCM_RIGHTS, how QMP's
/// <c>getfd</c> receives one), and the process ID of a socket's peer (SO_PEERCRED).
/// </summary>
internal static partial class UnixSocket
{
    private const int AF_UNIX = 1, SOCK_STREAM = 1, SOCK_CLOEXEC = 0x80000;
    private const int SOL_SOCKET = 1, SCM_RIGHTS = 1, SO_PEERCRED = 17, SO_SNDBUF = 7;
    private const int MSG_NOSIGNAL = 0x4000;
    private const int EINTR = 4, EAGAIN = 11;
    private const short POLLOUT = 4;

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial int socketpair(int domain, int type, int protocol, int* fds);

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial nint sendmsg(int fd, MsgHdr* message, int flags);

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial int getsockopt(int fd, int level, int name, void* value, ref uint length);

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial int setsockopt(int fd, int level, int name, void* value, uint length);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int close(int fd);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int poll(ref PollFd fd, nuint count, int timeoutMs);

    [StructLayout(LayoutKind.Sequential)]
    private unsafe struct MsgHdr
    {
        public void* Name;
        public uint NameLength;
        public IoVec* Iov;
        public nuint IovLength;
        public void* Control;
        public nuint ControlLength;
        public int Flags;
    }

    [StructLayout(LayoutKind.Sequential)]
    private unsafe struct IoVec
    {
        public void* Base;
        public nuint Length;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct PollFd
    {
        public int Fd;
        public short Events;
        public short Revents;
    }

    /// <summary>A connected pair: <c>Ours</c> as a .NET socket, <c>Theirs</c> as a raw descriptor to hand to QEMU and then close.</summary>
    internal static unsafe (Socket Ours, int Theirs) Pair(int sendBufferBytes)
    {
        int* fds = stackalloc int[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
            throw Error("socketpair");
        try
        {
            int size = sendBufferBytes;
            setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &size, sizeof(int));   // a hint; the kernel may cap it
            var ours = new Socket(new SafeSocketHandle(fds[0], ownsHandle: true));
            return (ours, fds[1]);
        }
        catch
        {
            close(fds[0]);
            close(fds[1]);
            throw;
        }
    }

    /// <summary>Closes a raw descriptor (QEMU's end of the pair once QEMU holds its own copy).</summary>
    internal static void Close(int fd)
    {
        if (fd >= 0) close(fd);
    }

    /// <summary>Sends all of <paramref name="data"/> on <paramref name="socket"/>, the descriptor <paramref name="fd"/> (when not -1) attached to its first byte.</summary>
    internal static unsafe void Send(Socket socket, ReadOnlySpan<byte> data, int fd, string what)
    {
        int handle = (int)socket.SafeHandle.DangerousGetHandle();
        const int controlSize = 24;   // CMSG_SPACE(sizeof(int)) on 64-bit Linux
        byte* control = stackalloc byte[controlSize];
        fixed (byte* start = data)
        {
            int sent = 0;
            bool fdPending = fd >= 0;
            while (sent < data.Length)
            {
                var iov = new IoVec { Base = start + sent, Length = (nuint)(data.Length - sent) };
                var message = new MsgHdr { Iov = &iov, IovLength = 1 };
                if (fdPending)
                {
                    new Span<byte>(control, controlSize).Clear();
                    *(nuint*)control = 20;                  // CMSG_LEN(sizeof(int))
                    *(int*)(control + 8) = SOL_SOCKET;
                    *(int*)(control + 12) = SCM_RIGHTS;
                    *(int*)(control + 16) = fd;
                    message.Control = control;
                    message.ControlLength = controlSize;
                }
                nint n = sendmsg(handle, &message, MSG_NOSIGNAL);
                if (n < 0)
                {
                    int errno = Marshal.GetLastPInvokeError();
                    if (errno == EINTR) continue;
                    if (errno == EAGAIN)
                    {
                        var p = new PollFd { Fd = handle, Events = POLLOUT };
                        poll(ref p, 1, 1000);
                        continue;
                    }
                    throw new IOException($"sending {what} failed: {Marshal.GetPInvokeErrorMessage(errno)}");
                }
                sent += (int)n;
                fdPending = false;
            }
        }
    }

    /// <summary>The process ID of the peer of a connected Unix socket, or null when the kernel does not say.</summary>
    internal static unsafe int? PeerProcessId(Socket socket)
    {
        int* cred = stackalloc int[3];   // struct ucred: pid, uid, gid
        uint length = 12;
        if (getsockopt((int)socket.SafeHandle.DangerousGetHandle(), SOL_SOCKET, SO_PEERCRED, cred, ref length) != 0) return null;
        return cred[0] > 0 ? cred[0] : null;
    }

    private static IOException Error(string call) =>
        new($"{call} failed: {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
}
