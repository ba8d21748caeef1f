using System.Collections.Concurrent;

namespace Vmsnap.Storage.LowLevel;

/// <summary>
/// A small set of dedicated threads that run blocking positional I/O (pread/pwrite), so that
/// several requests are really in flight at once. The .NET thread pool adds threads slowly when
/// they block in system calls, which would cap the queue depth at the number of cores.
/// </summary>
public static class BlockingIo
{
    private const int MaxThreads = 32;
    private static readonly BlockingCollection<Action> s_queue = new();
    private static int s_threads;
    private static int s_idle;

    /// <summary>Runs <paramref name="work"/> on one of the I/O threads; the task completes when it has.</summary>
    public static ValueTask Run(Action work)
    {
        var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Enqueue(() =>
        {
            try { work(); tcs.SetResult(); }
            catch (Exception e) { tcs.SetException(e); }
        });
        return new ValueTask(tcs.Task);
    }

    /// <summary>Runs <paramref name="work"/> on one of the I/O threads; the task gives its result.</summary>
    public static ValueTask<T> Run<T>(Func<T> work)
    {
        var tcs = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Enqueue(() =>
        {
            try { tcs.SetResult(work()); }
            catch (Exception e) { tcs.SetException(e); }
        });
        return new ValueTask<T>(tcs.Task);
    }

    private static void Enqueue(Action item)
    {
        s_queue.Add(item);
        // Start another worker when more items wait than workers are idle.
        if (s_queue.Count > Volatile.Read(ref s_idle))
        {
            int n = Volatile.Read(ref s_threads);
            if (n < MaxThreads && Interlocked.CompareExchange(ref s_threads, n + 1, n) == n)
                new Thread(Worker) { IsBackground = true, Name = "vmsnap-io" }.Start();
        }
    }

    private static void Worker()
    {
        while (true)
        {
            Interlocked.Increment(ref s_idle);
            Action item = s_queue.Take();
            Interlocked.Decrement(ref s_idle);
            item();
        }
    }
}
